"""What the families' output checks share: the error of one output against its fp64 ground truth."""


def rel_error(got, want, what: str, tol: float) -> float:
    """max |got - want| / max |want| (got read as want's shape, in float64); AssertionError above tol."""
    assert got is not None, f"{what}: no gradient"
    assert got.numel() == want.numel(), f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    err = float((got.reshape(want.shape).double() - want).abs().max() / want.abs().max().clamp_min(1e-30))
    assert err <= tol, f"{what}: max error {err:.2e} of max |value| (tolerance {tol:.0e})"
    return err
