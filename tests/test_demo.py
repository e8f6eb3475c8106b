from __future__ import annotations

import json

from misp import demo
from misp.data.world.generate import MANIFEST, WORLD_VERSION


def test_a_world_from_another_version_makes_the_demo_rerun_everything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not demo.world_is_stale()  # no world yet: the world stage simply runs
    path = tmp_path / demo.WORLD / MANIFEST
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"version": WORLD_VERSION}))
    assert not demo.world_is_stale()
    path.write_text(json.dumps({"version": WORLD_VERSION - 1}))
    assert demo.world_is_stale()
    path.write_text("{truncated")
    assert demo.world_is_stale()
