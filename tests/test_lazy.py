import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("package", "name"),
    [("scaledl.comm", "get_compressor"), ("scaledl.optim", "CSER"), ("scaledl.medical", "froc")],
)
def test_lazy_exports_resolve_and_cache(package, name):
    code = (
        f"import sys, {package} as p; assert 'torch' not in sys.modules;"
        f"v = p.{name}; assert callable(v) and vars(p)['{name}'] is v;"
        f"assert '{name}' in dir(p); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_unknown_name_is_an_attribute_error():
    import scaledl.comm

    with pytest.raises(AttributeError, match=r"'scaledl\.comm' has no attribute 'nope'"):
        scaledl.comm.nope  # noqa: B018
