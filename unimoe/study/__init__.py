"""``unimoe study``: a grid of arms x seeds (each arm a curriculum or one stage recipe), run resumably,
with shared stages trained once, one MLflow parent run, and a report (tables + plots).

Modules: :mod:`.schema` (the study file and its cells), :mod:`.run` (running, resuming, MLflow,
evaluation), :mod:`.report` (numbers from the stages' own files, mean/std over seeds),
:mod:`.plots` (curves and bar charts). See docs/study.md.
"""

from unimoe.study.report import build_report, cell_summary, write_report
from unimoe.study.run import CELL_FILE, StudyRunner, cell_finished
from unimoe.study.schema import Arm, Cell, Study, load_study

__all__ = ["Arm", "CELL_FILE", "Cell", "Study", "StudyRunner", "build_report", "cell_finished", "cell_summary",
           "load_study", "write_report"]
