"""The notebooks: each one runs top to bottom from a fresh kernel, and the committed copies
carry their outputs (with at least one figure) and no absolute paths of the machine that ran them.

Each notebook is executed with nbclient in a fresh kernel of this interpreter, with the working
directory notebooks/ (as when a reader opens it there); it writes its scratch files under
notebooks/_work/. A failing cell fails the test with the cell's traceback.

To re-execute the notebooks and save them with their outputs (what is committed):

    .venv/bin/python tests/test_notebooks.py            # all of them
    .venv/bin/python tests/test_notebooks.py 02_model   # the ones whose name contains 02_model

Saving collapses carriage-return redraws (progress bars) in text outputs to what a terminal
would finally show, and refuses to save a notebook whose outputs contain an absolute path.
"""
from __future__ import annotations

import json
import pathlib
import re
import sys
import tempfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))
EXPECTED = ["01_data", "02_model", "03_train_evaluate", "04_export_runtime", "05_search"]
CELL_TIMEOUT = 600  # seconds per cell
KERNEL_NAME = "imram-min-test"
# Absolute paths of a machine: POSIX homes, scratch and system folders, Windows drives, and this checkout.
ABSOLUTE_PATH = re.compile(r"(?<![\w.~])/(?:work|tmp|root|home|Users|private|var/folders|opt|usr|mnt)/|\b[A-Za-z]:\\(?:Users|Windows)\\")

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


# --------------------------------------------------------------------------- execution
def kernel_manager(folder: pathlib.Path):
    """A KernelManager that starts ipykernel with *this* interpreter, whatever kernel specs are installed."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = folder / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (imram-min tests)", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(folder / "kernels")])
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def execute(path: pathlib.Path):
    """Run the notebook at ``path`` in a fresh kernel (cwd notebooks/); returns (executed notebook, seconds)."""
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, km=kernel_manager(pathlib.Path(tmp)),
                                         resources={"metadata": {"path": str(NB_DIR)}})
        start = time.perf_counter()
        client.execute()
        return nb, time.perf_counter() - start


# --------------------------------------------------------------------------- output checks
def output_texts(nb) -> list[str]:
    """Every text held in the outputs of the code cells (streams, text/plain, html, errors)."""
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                texts.append(out["text"])
            for key, value in out.get("data", {}).items():
                if key.startswith("text/") or key == "application/json":
                    texts.append(value if isinstance(value, str) else json.dumps(value))
            texts += out.get("traceback", [])
    return texts


def absolute_paths(nb) -> list[str]:
    """Snippets of outputs and sources that contain an absolute path of a machine."""
    found = []
    sources = [cell.source for cell in nb.cells]
    for text in output_texts(nb) + sources:
        if str(ROOT) in text:
            found.append(str(ROOT))
        for m in ABSOLUTE_PATH.finditer(text):
            found.append(text[max(0, m.start() - 40):m.end() + 40])
    return found


def has_image(nb) -> bool:
    return any("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


def collapse_carriage_returns(text: str) -> str:
    """What a terminal finally shows: of each line's \\r-separated redraws keep the last non-blank one."""
    lines = []
    for line in text.split("\n"):
        parts = [p for p in line.split("\r") if p.strip()]
        lines.append(parts[-1].rstrip() if parts else "")
    return "\n".join(lines)


def clean(nb):
    """Merge consecutive stream outputs of the same stream, collapse progress-bar redraws, drop empty ones."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged = []
        for out in cell.outputs:
            if out.output_type == "stream" and merged and merged[-1].output_type == "stream" \
                    and merged[-1].name == out.name:
                merged[-1].text += out.text
            else:
                merged.append(out)
        outputs = []
        for out in merged:
            if out.output_type == "stream":
                out.text = re.sub(r"\n{3,}", "\n\n", collapse_carriage_returns(out.text))
                if not out.text.strip():
                    continue
            outputs.append(out)
        cell.outputs = outputs
    return nb


# --------------------------------------------------------------------------- tests
def test_the_notebooks_are_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_from_a_fresh_kernel(path):
    nb, seconds = execute(path)  # a failing cell raises CellExecutionError with its traceback
    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, f"{path.name}: error outputs {errors}"
    assert has_image(nb), f"{path.name}: no figure when executed"
    print(f"{path.name}: {seconds:.1f} s")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_outputs_and_no_machine_paths(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, f"{path.name}: no code cells"
    unexecuted = [i for i, cell in enumerate(code) if cell.source.strip() and cell.execution_count is None]
    assert not unexecuted, f"{path.name}: code cells {unexecuted} were not executed; run tests/test_notebooks.py"
    counts = [cell.execution_count for cell in code if cell.source.strip()]
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: not executed top to bottom in one kernel"
    assert has_image(nb), f"{path.name}: no image/png output"
    errors = [out for cell in code for out in cell.outputs if out.output_type == "error"]
    assert not errors, f"{path.name}: committed with an error output"
    assert not absolute_paths(nb), f"{path.name}: absolute paths in the notebook: {absolute_paths(nb)[:3]}"
    assert not any("\r" in t for t in output_texts(nb)), f"{path.name}: uncollapsed carriage returns in outputs"


# --------------------------------------------------------------------------- re-executing and saving
def main(argv: list[str]) -> int:
    chosen = [p for p in NOTEBOOKS if not argv or any(a in p.stem for a in argv)]
    for path in chosen:
        nb, seconds = execute(path)
        clean(nb)
        bad = absolute_paths(nb)
        if bad:
            print(f"{path.name}: NOT saved, absolute paths in outputs: {bad[:3]}", file=sys.stderr)
            return 1
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
        nbformat.write(nb, path)
        print(f"{path.relative_to(ROOT)}: executed in {seconds:.1f} s and saved")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
