"""pytorch_wavelets, the spectral family's peer, imported without installing anything.

pytorch_wavelets 1.3.0 reads its filter tables through ``pkg_resources``, which setuptools 70 and later
no longer ship. Where it is missing, a stand-in offering the one function it calls (resource_stream,
through importlib.resources) is visible during the import only, so nothing else in the process sees
a fake pkg_resources.
"""
import importlib.resources
import sys
import types


def load():
    """The pytorch_wavelets module, or raise ImportError with the reason."""
    stand_in = None
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("pkg_resources")
        stand_in.resource_stream = lambda package, name: importlib.resources.files(package).joinpath(name).open("rb")
        sys.modules["pkg_resources"] = stand_in
    try:
        import pytorch_wavelets
    finally:
        if stand_in is not None and sys.modules.get("pkg_resources") is stand_in:
            del sys.modules["pkg_resources"]
    return pytorch_wavelets


def transforms(dtype):
    """(DTCWTForward(J=1, near_sym_b, qshift_b), DTCWTInverse(near_sym_b, qshift_b)) in ``dtype``."""
    pw = load()
    return (pw.DTCWTForward(J=1, biort="near_sym_b", qshift="qshift_b").to(dtype),
            pw.DTCWTInverse(biort="near_sym_b", qshift="qshift_b").to(dtype))
