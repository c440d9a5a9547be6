"""`toolkit samples RUN_DIR`: write validation images of a run as PNG files, to try predict and the server."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from toolkit.data import build_data
from toolkit.rundir import load_run_config


def write_samples(run_dir: Path, out_dir: Path, count: int = 8) -> list[Path]:
    """The first `count` validation images, as stored (uint8, model size), named <index>_<class>.png."""
    bundle = build_data(load_run_config(run_dir).data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(min(count, len(bundle.val))):
        image, label = bundle.val[index]
        array = image.permute(1, 2, 0).squeeze(-1).numpy()  # C x H x W -> H x W (x C)
        path = out_dir / f"{index:03d}_{bundle.classes[int(label)]}.png"
        Image.fromarray(array, "L" if array.ndim == 2 else "RGB").save(path)
        paths.append(path)
    return paths
