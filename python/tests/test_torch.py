"""import_torch: PyTorch-saved checkpoints against PyTorch's committed outputs
(scripts/torch_refs.py), and in-memory state dicts."""

import numpy as np
from conftest import TORCH, read_safetensors

import unetpp

# float16 references: half a unit in the last place at 1.0, plus float32 arithmetic.
TOLERANCE = 2.0**-11 + 1e-5


def test_pth_files_give_pytorchs_probabilities(tmp_path):
    refs = read_safetensors(TORCH / "scaling" / "probabilities.safetensors")
    compared = 0
    for folder, normalize in [("imagenet", "imagenet"), ("window", "window:1000:40000")]:
        model = unetpp.import_torch(
            TORCH / "scaling" / f"{folder}_model.pth", tmp_path / f"{folder}.unetpp", normalize=normalize
        )
        assert model.config["data"]["normalize"]["kind"] == normalize.split(":")[0]
        for image in sorted((TORCH / "scaling" / folder).iterdir()):
            probs = model.predict_file(image, probabilities=True)
            for c in range(probs.shape[0]):
                want = refs[f"{image.stem}_prob{c}"].astype(np.float32)
                assert want.std() > 0.01, "the reference hardly varies"
                assert np.abs(probs[c] - want).max() <= TOLERANCE, f"{image.name} class {c}"
                compared += 1
    assert compared == 3 + 2 * 3


def test_an_in_memory_state_dict_imports_as_its_file(tmp_path):
    from_file = unetpp.import_torch(TORCH / "nested_c1_k1_ds.pth", tmp_path / "file.unetpp", normalize="zscore")
    state = {"epoch": 3, "state_dict": read_safetensors(TORCH / "nested_c1_k1_ds.safetensors")}
    from_dict = unetpp.import_torch(state, tmp_path / "dict.unetpp", normalize="zscore")
    x = np.random.default_rng(0).normal(size=(48, 64)).astype(np.float32)
    for mode in from_file.modes:
        np.testing.assert_array_equal(from_dict.predict(x, mode, True), from_file.predict(x, mode, True))
    # A state dict missing a tensor is refused, naming it and not the temporary file.
    del state["state_dict"]["conv0_0.conv1.weight"]
    try:
        unetpp.import_torch(state, tmp_path / "bad.unetpp")
    except unetpp.UnetppError as e:
        assert "conv0_0.conv1.weight" in str(e) and "the state dict" in str(e), str(e)
    else:
        raise AssertionError("an incomplete state dict was imported")
    assert not (tmp_path / "bad.unetpp").exists()
