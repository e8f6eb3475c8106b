"""Offline inputs for the lmms-eval hand-off (examples/lmms_eval_handoff.sh): a tiny real-architecture
model in the hub's layout, a LoRA checkpoint of it as a misp preference run writes one, and a small
POPE-layout benchmark as a local parquet file.

Nothing here is downloaded: the model is built from transformers' config classes with random weights
(misp.testing), the images are drawn. With a real run you skip this script and start from your own
``RUN/checkpoints/last.ckpt`` and the real benchmark.

    python examples/lmms_eval_prepare.py --out runs/lmms-handoff --family llava15
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from misp.testing.lora_checkpoint import write_lora_checkpoint

OBJECTS = ("dog", "cat", "person", "car", "bus", "cow", "bottle", "chair")


def build_base(family: str, out: Path) -> None:
    """Write a tiny randomly initialised model of ``family`` in its hub repo's file layout to ``out``."""
    if family == "llava15":
        from misp.testing.llava15 import Llava15Sizes, build_llava15, save_hub_files

        model, processor = build_llava15(Llava15Sizes(image_size=56))
        save_hub_files(model, processor, out)
    elif family == "qwen25vl":
        from misp.testing.qwen25vl import build_qwen25vl, save_qwen25vl_hub_files

        model, processor = build_qwen25vl()
        save_qwen25vl_hub_files(model, processor, out)
    else:
        raise SystemExit(f"--family: unknown family {family!r}; one of llava15, qwen25vl")


def write_pope_parquet(path: Path, n: int = 8) -> None:
    """``n`` questions in the columns of lmms-lab/POPE (what lmms-eval's ``pope`` task reads): question_id,
    question, answer ("yes"/"no"), image_source, image (a datasets Image struct: PNG bytes), category."""
    rows = []
    for q in range(n):
        img = Image.new("RGB", (64, 64), (30 * q % 256, 20, 200 - 20 * q))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        rows.append({"id": str(q), "question_id": str(q + 1),
                     "question": f"Is there a {OBJECTS[q % len(OBJECTS)]} in the image?",
                     "answer": "yes" if q % 2 else "no", "image_source": f"COCO_val2014_{q:012d}",
                     "image": {"bytes": buf.getvalue(), "path": None}, "category": "random"})
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("id", pa.string()), ("question_id", pa.string()), ("question", pa.string()),
                        ("answer", pa.string()), ("image_source", pa.string()), ("image", image_type),
                        ("category", pa.string())],
                       # the features block datasets writes, so the column loads as images, not dicts
                       metadata={b"huggingface": b'{"info": {"features": {'
                                 b'"id": {"dtype": "string", "_type": "Value"}, '
                                 b'"question_id": {"dtype": "string", "_type": "Value"}, '
                                 b'"question": {"dtype": "string", "_type": "Value"}, '
                                 b'"answer": {"dtype": "string", "_type": "Value"}, '
                                 b'"image_source": {"dtype": "string", "_type": "Value"}, '
                                 b'"image": {"_type": "Image"}, '
                                 b'"category": {"dtype": "string", "_type": "Value"}}}}'})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder: base/, last.ckpt, pope/test.parquet")
    parser.add_argument("--family", default="llava15", help="llava15 or qwen25vl")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    build_base(args.family, args.out / "base")
    write_lora_checkpoint(args.out / "base", args.out / "last.ckpt")
    write_pope_parquet(args.out / "pope" / "test.parquet")
    print(f"wrote {args.out}/base, {args.out}/last.ckpt, {args.out}/pope/test.parquet")


if __name__ == "__main__":
    main()
