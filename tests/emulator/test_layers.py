import dataclasses

import pytest

from emulator.layers import LayerMap, make_layer_map


def test_stride_two_keeps_every_second_middle_block_starting_at_k():
    lm = make_layer_map(8, 2, 2)
    assert lm.bottom == (0, 1) and lm.top == (6, 7)
    assert lm.middle_kept == (2, 4)
    assert lm.dropped() == (3, 5)
    assert lm.emulator_layers() == (0, 1, 2, 4, 6, 7)
    assert lm.adapter_layers() == (0, 1, 6, 7)
    assert lm.emulator_index() == {0: 0, 1: 1, 2: 2, 4: 3, 6: 4, 7: 5}
    assert lm.middle_positions() == (2, 3)


def test_smollm2_shape():
    lm = make_layer_map(30, 2, 2)
    assert lm.middle_kept == tuple(range(2, 28, 2))
    assert lm.dropped() == tuple(range(3, 28, 2))
    assert len(lm.emulator_layers()) == 17


@pytest.mark.parametrize(
    "L,k,n,middle",
    [
        (4, 1, 1, (1, 2)),  # stride 1 keeps the whole middle
        (3, 1, 1, (1,)),  # smallest valid backbone
        (10, 2, 3, (2, 5)),  # last middle block (7) dropped: 7-2 not a multiple of 3
        (10, 2, 100, (2,)),  # stride past the middle keeps only its first block
        (9, 4, 2, (4,)),
    ],
)
def test_edge_cases(L, k, n, middle):
    lm = make_layer_map(L, k, n)
    assert lm.middle_kept == middle
    assert set(lm.emulator_layers()) | set(lm.dropped()) == set(range(L))
    assert not set(lm.emulator_layers()) & set(lm.dropped())


@pytest.mark.parametrize(
    "L,k,n,needle",
    [(8, 0, 2, "adapter_layers must be >= 1"), (8, 4, 1, "2*adapter_layers must be < num_layers"), (2, 1, 1, "< num_layers"), (8, 2, 0, "stride must be >= 1")],
)
def test_bad_arguments_raise_one_line(L, k, n, needle):
    with pytest.raises(ValueError, match=needle) as err:
        make_layer_map(L, k, n)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "fields,needle",
    [
        ((8, (0,), (2,), (6, 7)), "same k"),
        ((8, (1, 2), (3,), (6, 7)), "first k blocks"),
        ((8, (0, 1), (3,), (5, 6)), "last k blocks"),
        ((8, (0, 1), (), (6, 7)), "middle_kept"),
        ((8, (0, 1), (4, 3), (6, 7)), "middle_kept"),
        ((8, (0, 1), (1, 3), (6, 7)), "middle_kept"),
        ((8, (0, 1), (3, 6), (6, 7)), "middle_kept"),
        ((4, (0, 1), (2,), (2, 3)), "2k must be < num_layers"),
    ],
)
def test_invalid_maps_are_rejected(fields, needle):
    with pytest.raises(ValueError, match=needle):
        LayerMap(*fields)


def test_dict_round_trip_and_frozen():
    lm = make_layer_map(12, 3, 2)
    data = lm.to_dict()
    assert data == {"num_layers": 12, "bottom": [0, 1, 2], "middle_kept": [3, 5, 7], "top": [9, 10, 11]}
    assert LayerMap.from_dict(data) == lm
    with pytest.raises(ValueError, match="missing field 'top'"):
        LayerMap.from_dict({k: v for k, v in data.items() if k != "top"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        lm.num_layers = 3  # type: ignore[misc]


def test_share_fills_each_dropped_slot_with_its_nearest_kept_middle_block():
    lm = make_layer_map(8, 2, 2, fill="share")
    assert lm.middle_kept == (2, 4) and lm.dropped() == (3, 5)
    assert lm.slots == (0, 1, 2, 2, 4, 4, 6, 7)  # 3: tie between 2 and 4 goes to the earlier; 5: only 4 is a middle block
    assert lm.emulator_layers() == (0, 1, 2, 4, 6, 7)  # stored once each
    assert lm.stack() == lm.slots and lm.compact().stack() == lm.emulator_layers()
    assert lm.emulator_index() == {0: 0, 1: 1, 2: 2, 4: 4, 6: 6, 7: 7}  # each kept block in its own slot
    assert lm.middle_positions() == (2, 4)
    far = make_layer_map(12, 2, 4, fill="share")  # keeps 2, 6; 7 is nearer 6 than top adapter 10, and never an adapter
    assert far.slots == (0, 1, 2, 2, 2, 6, 6, 6, 6, 6, 10, 11)
    assert LayerMap.from_dict(lm.to_dict()) == lm and lm.to_dict()["fill"] == "share"
    assert "fill" not in make_layer_map(8, 2, 2).to_dict()  # drop maps keep their old dict
    assert make_layer_map(8, 2, 1, fill="share").slots == tuple(range(8))


@pytest.mark.parametrize(
    "slots,needle",
    [
        ((0, 1, 2, 2, 4, 4, 6), "one slot per block"),
        ((0, 1, 2, 3, 4, 4, 6, 7), "slot 3 runs block 3"),  # a dropped block is not in the package
        ((0, 1, 2, 1, 4, 4, 6, 7), "slot 3 runs block 1"),  # adapters train: never shared
        ((0, 1, 4, 2, 4, 4, 6, 7), "slot 2 runs block 4, must run itself"),
        ((0, 0, 2, 2, 4, 4, 6, 7), "slot 1 runs block 0, must run itself"),
    ],
)
def test_invalid_share_slots_are_rejected(slots, needle):
    with pytest.raises(ValueError, match=needle):
        LayerMap(8, (0, 1), (2, 4), (6, 7), "share", slots)
    with pytest.raises(ValueError, match="only for fill 'share'"):
        LayerMap(8, (0, 1), (2, 4), (6, 7), "drop", (0, 1, 2, 2, 4, 4, 6, 7))
    with pytest.raises(ValueError, match="fill must be one of"):
        make_layer_map(8, 2, 2, fill="copy")


def test_keep_share_drops_evenly_spaced_blocks_first_and_last_kept():
    lm = make_layer_map(30, 2, 3, keep=0.8)  # FedBiOT's mild compression: every fifth middle block dropped
    assert len(lm.middle_kept) == 21 and lm.middle_kept[0] == 2 and lm.middle_kept[-1] == 27
    assert lm.dropped() == (4, 9, 14, 19, 24)
    assert make_layer_map(30, 2, 3, keep=1.0).middle_kept == make_layer_map(30, 2, 1).middle_kept
    assert make_layer_map(4, 1, 1, keep=0.1).middle_kept == (1,)  # at least one block
    assert make_layer_map(4, 1, 1, keep=0.8).middle_kept == (1,)  # keep < 1 drops at least one
    assert make_layer_map(4, 1, 1, keep=1.0).middle_kept == (1, 2) and make_layer_map(5, 2, 1, keep=0.5).middle_kept == (2,)
    shared = make_layer_map(30, 2, 3, "share", keep=0.8)
    assert shared.middle_kept == lm.middle_kept and shared.slots[4] == 3 and shared.slots[9] == 8


@pytest.mark.parametrize("keep", [-0.1, 1.5])
def test_keep_out_of_range_raises_one_line(keep):
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]") as err:
        make_layer_map(30, 2, 3, keep=keep)
    assert "\n" not in str(err.value)
