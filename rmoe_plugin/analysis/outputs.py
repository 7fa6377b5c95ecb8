"""Output files of the analysis tools: new files only, never an input."""
import os
from typing import Iterable, List

from ..engine.checkpoint import check_output_path


def check_outputs(out_dir: str, names: Iterable[str], inputs: Iterable[str],
                  overwrite: bool = False) -> List[str]:
    """Create ``out_dir`` and return the paths of ``names`` in it, refusing to overwrite.

    Args:
        out_dir (str): output folder (created if missing).
        names (Iterable[str]): file names the tool will write there.
        inputs (Iterable[str]): files the tool reads; none may be an output.
        overwrite (bool): allow replacing outputs of an earlier run. Default: False.

    Raises:
        ValueError: an output path is one of the inputs, or ``out_dir`` is a file.
        FileExistsError: an output exists and ``overwrite`` is False.
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f'--out {out_dir!r} is a file, not a folder')
    paths = [os.path.join(out_dir, name) for name in names]
    inputs = list(inputs)
    for path in paths:
        check_output_path(inputs, path, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    return paths
