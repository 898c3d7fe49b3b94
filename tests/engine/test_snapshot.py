from __future__ import annotations

import pytest
import torch

from lightning_evalguard.engine.snapshot import SnapshotPool, clone_state, state_tensors


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))


def test_state_tensors_covers_parameters_and_buffers() -> None:
    m = model()
    tensors = state_tensors(m)
    assert len(tensors) == len(list(m.parameters())) + len(list(m.buffers()))
    assert all(not t.requires_grad for t in tensors)


def test_capture_is_a_copy_unaffected_by_later_training() -> None:
    live = model()
    pool = SnapshotPool(lambda: clone_state(live), size=2)
    slot = pool.acquire()
    pool.capture(slot, state_tensors(live))
    expected = [t.clone() for t in state_tensors(live)]
    opt = torch.optim.SGD(live.parameters(), lr=1.0)
    live(torch.randn(8, 4)).sum().backward()  # changes BatchNorm running stats too
    opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(state_tensors(live), expected, strict=True))
    for got, want in zip(slot.tensors, expected, strict=True):
        assert torch.equal(got, want)
        assert got.data_ptr() not in {t.data_ptr() for t in state_tensors(live)}


def test_pool_grows_lazily_up_to_size_and_reuses_slots() -> None:
    made = []

    def factory() -> list[torch.Tensor]:
        made.append(1)
        return [torch.zeros(10)]

    pool = SnapshotPool(factory, size=2)
    assert pool.allocated == 0
    a = pool.acquire()
    b = pool.acquire()
    assert pool.acquire() is None  # both busy, at the size limit
    assert len(made) == 2
    pool.release(a)
    assert pool.acquire() is a  # reused, not re-made
    assert len(made) == 2
    assert pool.peak_allocated == 2
    assert b is not None


def test_retired_slot_is_never_handed_out_again() -> None:
    pool = SnapshotPool(lambda: [torch.zeros(1)], size=1)
    stuck = pool.acquire()
    pool.retire(stuck)
    fresh = pool.acquire()
    assert fresh is not None
    assert fresh is not stuck
    pool.release(stuck)  # a late release of a retired slot changes nothing
    assert pool.acquire() is None


def test_release_idle_frees_bytes_beyond_keep() -> None:
    pool = SnapshotPool(lambda: [torch.zeros(256)], size=3)
    slots = [pool.acquire() for _ in range(3)]
    for s in slots:
        pool.release(s)
    assert pool.release_idle(keep=1, min_idle_s=3600) == 0  # all used moments ago: kept
    assert pool.release_idle(keep=1) == 2 * 256 * 4
    assert pool.allocated == 1


def test_capture_refuses_a_changed_model() -> None:
    pool = SnapshotPool(lambda: [torch.zeros(3)], size=1)
    slot = pool.acquire()
    with pytest.raises(ValueError, match="does not match"):
        pool.capture(slot, [torch.zeros(4)])
    with pytest.raises(ValueError, match="1 tensors but the module now has 2"):
        pool.capture(slot, [torch.zeros(3), torch.zeros(3)])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_capture_is_ordered_by_events_without_host_sync() -> None:
    device = torch.device("cuda")
    live = model().to(device)
    pool = SnapshotPool(lambda: clone_state(live), size=2)
    slot = pool.acquire()
    expected = [t.clone() for t in state_tensors(live)]
    pool.capture(slot, state_tensors(live))
    assert slot.copied_event is not None
    # The main stream waits on the copy: an in-place update enqueued now cannot race it.
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        side.wait_event(slot.copied_event)
        got = [t.clone() for t in slot.tensors]
    side.synchronize()
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)
