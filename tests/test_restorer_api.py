"""The Restorer as a library caller meets it: what comes back can be used like any tensor or array."""

import pytest
import torch
from conftest import lively_model

import qairn


@pytest.mark.parametrize("tile", [None, 16])
def test_tensor_maps_are_ordinary_tensors_whole_or_tiled(tile):
    """The whole-image pass handed back views of the backend's gammas, made under inference_mode:
    maps[k].mul_(255) raised "Inplace update to inference tensor outside InferenceMode", while the
    tiled pass's maps took it. Both are ordinary tensors now."""
    r = qairn.Restorer(model=lively_model(), device="cpu", tile=tile, overlap=0)
    x = torch.rand(2, 3, 20, 30, generator=torch.Generator().manual_seed(0))
    res = r.restore(x, return_maps=True)
    y, u, v = (torch.full(s, 128, dtype=torch.uint8) for s in ((20, 30), (10, 15), (10, 15)))
    for maps in (res.maps, r.restore_yuv(y, u, v, return_maps=True).maps):
        for m in maps:
            assert not m.is_inference()
            m.mul_(255)  # raised on the whole-image pass
