import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def output_kinds(cell):
    """What a code cell showed: printed text, a figure, a value."""
    kinds = set()
    for o in cell.outputs:
        if o.output_type == "stream":
            kinds.add(o.name)
        elif o.output_type in ("display_data", "execute_result"):
            kinds.update(k for k in o.data if k in ("image/png", "text/plain"))
    return kinds


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_and_shows_what_its_committed_run_showed(path, tmp_path, monkeypatch):
    """Execute every cell headless, as a reader would top to bottom, on a copy in memory; runs go to a
    temporary directory (PLAMO2_OUT), not the repository's out/. Any error, or a failed assert in
    a cell (the notebooks check their own claims), fails the test; so does a cell that no longer
    prints or plots what the committed notebook shows (so the committed outputs are a real run's)."""
    committed = nbformat.read(path, as_version=4)
    nb = nbformat.read(path, as_version=4)
    monkeypatch.setenv("PLAMO2_OUT", str(tmp_path))
    # A cell takes at most a few minutes on 2 idle cores; on a busy machine it takes longer in
    # proportion to the load (jobs waiting per core), so the limit that catches a hang grows with it.
    busy = max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    NotebookClient(nb, timeout=int(600 * busy), kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    code = [(a, b) for a, b in zip(committed.cells, nb.cells) if a.cell_type == "code"]
    for i, (was, now) in enumerate(code):
        assert output_kinds(now) - {"stderr"} == output_kinds(was) - {"stderr"}, \
            f"code cell {i} ({was.source[:50]!r}) shows other things than the committed run: re-run and commit it"
    assert any(output_kinds(now) for _, now in code) and os.listdir(tmp_path)
