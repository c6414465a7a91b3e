"""Small helpers for the tests: inputs in every layout, and error measures."""
import torch

FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def randn(shape, generator, dtype=torch.float32, scale=1.0, offset=0.0):
    """Fresh normal values in float64, then cast: every dtype sees the same numbers."""
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale + offset).to(dtype)


def in_layout(x, layout):
    """x with the same values laid out as `layout`: contiguous, channels_last or noncontiguous."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        if x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        if x.dim() == 5:
            return x.contiguous(memory_format=torch.channels_last_3d)
        # (N, C) and (N, C, L): channels innermost, the layout channels_last has in 4-D.
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "noncontiguous":
        # Every other element along the last dim of a twice-as-wide tensor: strided, not dense.
        wide = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        wide[..., ::2] = x
        view = wide[..., ::2]
        assert not view.is_contiguous() or x.shape[-1] == 1
        return view
    raise ValueError(layout)


def formats_of(t):
    """Which memory formats t satisfies: compared between ours and nn."""
    result = []
    for fmt in FORMATS:
        try:
            result.append(t.is_contiguous(memory_format=fmt))
        except RuntimeError:  # channels_last for a rank it does not apply to
            result.append(None)
    return tuple(result)


def rel_err(actual, expected):
    """max |actual - expected| / max |expected|, in float64."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual - expected).abs().max() / scale).item()


# Relative tolerances between two correct implementations in each dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
