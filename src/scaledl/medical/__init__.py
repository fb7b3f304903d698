"""Medical imaging: shape-prior segmentation (arXiv 2204.11090) and RECIST-Net detection
(arXiv 2107.08715).

Names are resolved lazily so that ``import scaledl.medical`` does not import MONAI or
scikit-image until a model or data generator is used.
"""

from __future__ import annotations

from scaledl._lazy import lazy_exports

#: public name -> submodule that defines it. Segmentation lives in ``shape_prior`` and
#: ``segmentation*`` modules, detection in ``recist*`` / ``froc_eval`` modules (not ``froc.py``: a
#: submodule of that name would shadow the function).
_EXPORTS: dict[str, str] = {
    # shape priors by pairwise comparison
    "ShapePriorNet": "scaledl.medical.shape_prior",
    "DenoisingAutoencoder": "scaledl.medical.anomaly",
    # RECIST-Net
    "RECISTNet": "scaledl.medical.recist_net",
    "mask_to_recist": "scaledl.medical.recist_geometry",
    "recist_to_box": "scaledl.medical.recist_geometry",
    "froc": "scaledl.medical.froc_eval",
    "make_lesion_dataset": "scaledl.medical.lesion_data",
    "read_dicom_slice": "scaledl.medical.lesion_data",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
