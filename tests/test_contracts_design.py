"""The typed contracts between rooms: PreferenceBatch, NegativeRef as the reference cache's key, and the
one-way handshake whose absence is one UserError line for every datamodule and module."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from misp.batch import ImageInputs, NegativeRef, PreferenceBatch, TokenRows
from misp.data.handshake import NotAttachedError
from misp.data.negative_sampler import NegativeSamplerDataModule
from misp.dpo.batching import concatenate_rows, row_keys
from misp.dpo.reference import ReferenceCache
from misp.errors import UserError


def _batch(b: int = 2, k: int = 3) -> PreferenceBatch:
    rows = TokenRows(torch.ones(b, 5, dtype=torch.long), torch.ones(b, 5, dtype=torch.long), torch.ones(b, 5, dtype=torch.long))
    images = ImageInputs({"pixel_values": torch.randn(b + b * k, 3, 4, 4)}, torch.full((b + b * k,), 4))
    refs = [[NegativeRef("random", f"pool/{r}-{j}.png", j) if j else NegativeRef("crop", seed=7 + r) for j in range(k)]
            for r in range(b)]
    return PreferenceBatch([f"r{i}" for i in range(b)], rows, rows, images, refs, torch.zeros(b, k),
                           torch.zeros(b, k, dtype=torch.long))


def test_a_preference_batch_moves_between_devices_whole():
    batch = _batch()
    moved = move_data_to_device(batch, torch.device("cpu"))
    assert isinstance(moved, PreferenceBatch) and isinstance(moved.images, ImageInputs)
    assert moved.negatives == batch.negatives and all(isinstance(r, NegativeRef) for x in moved.negatives for r in x)
    assert (moved.batch_size, moved.k, len(moved.images)) == (2, 3, 8)


def test_rows_and_keys_follow_the_batch_order():
    batch = _batch()
    rows = concatenate_rows(batch, pad_token_id=0)
    assert rows.input_ids.shape[0] == 2 * 2 + 2 * 3 and (rows.batch_size, rows.k) == (2, 3)
    # Row 2B + r*K + j reads image B + r*K + j: record r's j-th negative.
    assert rows.image_index.tolist() == [0, 1, 0, 1, 2, 3, 4, 5, 6, 7]
    keys = row_keys(batch)
    assert keys[:4] == [("r0", "chosen", "positive"), ("r1", "chosen", "positive"),
                        ("r0", "rejected", "positive"), ("r1", "rejected", "positive")]
    assert keys[4 + 3 * 1 + 2] == ("r1", "chosen", batch.negatives[1][2])


def test_the_reference_cache_keys_on_refs_keeps_files_only_and_survives_a_safe_checkpoint():
    batch = _batch()
    keys = row_keys(batch)
    cache = ReferenceCache()
    cache.store(keys, torch.arange(len(keys), dtype=torch.float64))
    seeded = [k for k in keys if isinstance(k[2], NegativeRef) and k[2].seed is not None]
    assert seeded and not any(k in cache.values for k in seeded)  # a crop is a new image every epoch
    assert len(cache.values) == len(keys) - len(seeded)
    buffer = io.BytesIO()
    torch.save(cache.state_dict(), buffer)
    buffer.seek(0)
    again = ReferenceCache()
    again.load_state_dict(torch.load(buffer, weights_only=True))  # plain data: loads in safe mode
    values, missing = again.lookup(keys)
    assert [bool(m) for m in missing] == [k in seeded for k in keys]
    assert values[~missing].tolist() == [float(i) for i, k in enumerate(keys) if k not in seeded]


def test_forgetting_the_handshake_is_one_user_error_line_for_every_datamodule(tiny_world, tmp_path):
    from misp.data.sft_data import SFTDataModule

    preference = NegativeSamplerDataModule(records_file=str(tiny_world / "pref.jsonl"),
                                           cache_dir=str(tmp_path), progress=False, preview_records=0)
    sft = SFTDataModule(train_file=str(tiny_world / "sft.jsonl"))
    for data in (preference, sft):
        with pytest.raises(NotAttachedError, match=r"call `datamodule.attach\(module\)`") as error:
            data.setup("fit")
        assert isinstance(error.value, UserError) and "\n" not in str(error.value)


def test_forgetting_the_handshake_is_the_same_error_for_every_module(vlm_dir):
    from misp.dpo import MISPDPOModule
    from misp.models.vlm import VLMSpec
    from misp.sae.module import SAEModule

    module = MISPDPOModule(VLMSpec(path=str(vlm_dir)))
    with pytest.raises(NotAttachedError, match=r"MISPDPOModule has no data description"):
        module.setup("test")  # it would otherwise score CHAIR on an empty vocabulary, silently
    with pytest.raises(NotAttachedError, match=r"SAEModule has no difference vectors"):
        SAEModule().configure_model()


def test_the_module_hands_the_data_its_methods_negatives(tiny_world, vlm_dir, tmp_path):
    """K has one home, the method: the module hands it to the data in the handshake; batches carry it."""
    from misp.dpo import MISPDPOModule
    from misp.dpo.method import Method
    from misp.models.vlm import VLMSpec

    module = MISPDPOModule(VLMSpec(path=str(vlm_dir)), method=Method.preset("mdpo"))
    data = NegativeSamplerDataModule(records_file=str(tiny_world / "pref.jsonl"), cache_dir=str(tmp_path),
                                     progress=False, preview_records=0, batch_size=4)
    data.attach(module)
    assert data.negatives is module.method.negatives and data.k == 1 and data.drawer.k == 1
    assert module.negatives.proposal_features() is None  # no SAE selection: nothing for q_phi to read
    assert module.eval_data is data.evaluation and data.processor is module.processor
    data.prepare_data()
    data.setup("fit")
    assert next(iter(data.train_dataloader())).k == 1
    dpo = MISPDPOModule(VLMSpec(path=str(vlm_dir)), method=Method.preset("dpo"))
    data.attach(dpo)
    assert data.k == 0 and data.draws_for_epoch(0) is None  # the DPO method draws nothing


def test_the_experiment_checks_a_training_command_without_importing_the_misp_command():
    """`misp` (misp.cli) runs `misp experiment`; the experiment parses each variant's training command through
    misp.lightning_cli, never misp.cli, so the two packages do not import each other (no import circle)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from misp.experiment.runner import check_fit_command\n"
        "check_fit_command(['fit', '--config', 'configs/shapes/preference.yaml', '--config', 'configs/methods/mdpo.yaml'])\n"
        "print(sorted(m for m in sys.modules if m == 'misp.cli'))\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-2000:] + out.stderr[-2000:]
