"""The rows of the SQuAD benchmark (benchmarks/squad_minilm.py): the teacher settings it searches,
the students it distils from the chosen teacher, and the files and settings they share. The runner
trains them; benchmarks/squad_minilm_report.py writes the page from their results."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEACHER_CONFIG = "configs/squad-minilm-teacher.yaml"
STUDENT_CONFIG = "configs/squad-minilm-student.yaml"
KB8 = "configs/glue-minilm-kb8.yaml"
GENERAL = "configs/distill-minilm-general.yaml"
ENWIKI = Path("enwiki-sample") / "articles.jsonl"
REPORT = "docs/benchmarks/squad_minilm.md"


# Settings whose value a row depends on, per kind: rows of a work folder must all share them.
TEACHER_KEYS = ("train_questions", "dev_questions", "batch_size", "mixed_precision", "teacher_epochs", "teacher_patience",
                "teacher_more_epochs")
STUDENT_KEYS = ("train_questions", "dev_questions", "batch_size", "mixed_precision", "student_epochs", "student_steps",
                "stage1_steps")


@dataclass(frozen=True)
class TeacherSetting:
    """One point of the teacher search: peak learning rate, window length and stride (tokens), and
    the most epochs (None: the invocation's ``--teacher-epochs``)."""

    lr: float
    max_length: int
    doc_stride: int
    epochs: int | None = None

    @property
    def name(self) -> str:
        """The row name, e.g. ``teacher-lr0.0001-L256-S96`` (``-E8`` appended for 8 epochs at most)."""
        return f"teacher-lr{self.lr:g}-L{self.max_length}-S{self.doc_stride}" + (f"-E{self.epochs}" if self.epochs else "")


@dataclass(frozen=True)
class StudentSpec:
    """A student row: its compression config, or the teacher layers a truncated student keeps.

    Attributes:
        name: the row name.
        what: one line for the report.
        compression: compression config file (compresses the fine-tuned teacher), or None.
        stage1: start from the stage-1 (general distillation) encoder of ``compression``.
        keep_layers: teacher layers a truncated student keeps (0-based), or None.
        budget_families: factor families of a budget student (``kronlm compress --budget-params N
            --families ...`` on the FFN matrices of the fine-tuned teacher, N the parameter count
            of ``compression`` applied to it), or None.
        lr: peak learning rate of the task distillation, or None for the student config's (2e-4,
            set for students that start far from the teacher).
        init: initialiser of every factor of ``compression`` in place of the config's own
            (``activation_aware``: fitted to the teacher's activations on the budget students'
            calibration text, so a fixed-shape student starts as a budget student does), or None.
    """

    name: str
    what: str
    compression: str | None = None
    stage1: bool = False
    keep_layers: tuple[int, ...] | None = None
    budget_families: tuple[str, ...] | None = None
    lr: float | None = None
    init: str | None = None


STUDENTS = {s.name: s for s in [
    StudentSpec("ffn2x", "FFN-only Kronecker 2x (`configs/minilm-ffn2x.yaml`: FFN in A (768,384) ⊗ B (2,1), out "
                "A (384,768) ⊗ B (1,2); attention, embeddings dense)", "configs/minilm-ffn2x.yaml"),
    StudentSpec("linear4x", "linear layers 4x (`configs/minilm-linear4x.yaml`: Q/K/V/O A (192,192) ⊗ B (2,2), FFN "
                "A (2,2) ⊗ B (768,192) and swapped; embeddings dense)", "configs/minilm-linear4x.yaml"),
    StudentSpec("kb8", f"KroneckerBERT8 shapes at MiniLM's sizes (`{KB8}`: Q/K/V/O 4x, FFN 16x, embeddings n = 8), "
                "no stage 1", KB8),
    StudentSpec("kb8-s1", "the same, started from stage 1 (the compressed pretrained encoder distilled from MiniLM on "
                "enwiki-sample text)", KB8, stage1=True),
    StudentSpec("truncated3", "the teacher truncated to its layers 0, 2, 4 (3 of 6; student layer l learns teacher layer "
                "1, 3, 5, so the last one feeds the copied span head as the teacher's last did): the baseline of dropping "
                "layers, at 17.2 M parameters between `ffn2x` and `linear4x`", keep_layers=(0, 2, 4)),
    StudentSpec("lowrank2x", "the low-rank baseline at `ffn2x`'s parameter count: the FFN matrices as truncated SVDs whose "
                "ranks the budget allocation chooses per matrix (`kronlm compress --budget-params N --families svd`, "
                "activation-aware, calibrated on 64 enwiki-sample windows); attention, embeddings dense",
                "configs/minilm-ffn2x.yaml", budget_families=("svd",)),
    StudentSpec("kron2x-budget", "`ffn2x`'s parameter count spent by the budget allocation on Kronecker factors only "
                "(`--families kronecker`: per-matrix shapes and terms, activation-aware init, the same calibration); "
                "attention, embeddings dense", "configs/minilm-ffn2x.yaml", budget_families=("kronecker",)),
    StudentSpec("ffn2x-aa", "`ffn2x`'s shapes with activation-aware factors (`--init activation_aware`, the budget "
                "students' calibration) instead of the nearest Kronecker products: which of the budget students' two "
                "differences, shapes or init, makes them better", "configs/minilm-ffn2x.yaml", init="activation_aware"),
    StudentSpec("lowrank2x-lr5e-5", "`lowrank2x` (the same initial student) at a peak learning rate of 5e-5 instead of 2e-4: "
                "a budget student starts close to the teacher, and at 2e-4 its held-out F1 falls after the warm-up",
                "configs/minilm-ffn2x.yaml", budget_families=("svd",), lr=5e-5),
    StudentSpec("kron2x-budget-lr5e-5", "`kron2x-budget` (the same initial student) at a peak learning rate of 5e-5",
                "configs/minilm-ffn2x.yaml", budget_families=("kronecker",), lr=5e-5),
]}
# The modules a budget student may factor: the FFN matrices, as in `ffn2x`.


FFN_MODULES = ("**.encoder.layer.*.intermediate.dense", "**.encoder.layer.*.output.dense")
# Calibration of the budget students: enwiki-sample windows (never SQuAD text, so no question of the split).
BUDGET_CALIBRATION_SEQUENCES = 64


def held_out_f1(row: dict) -> float:
    """A teacher row's held-out F1 at its best epoch (-inf when it recorded none)."""
    value = row["teacher"]["selection"].get("value")
    return float("-inf") if value is None else value


def chosen_teacher(rows: dict[str, dict]) -> dict | None:
    """The teacher row with the best held-out F1 (at its best epoch), or None without one."""
    teachers = [r for r in rows.values() if r["kind"] == "teacher"]
    if not teachers:
        return None
    return max(teachers, key=held_out_f1)


def is_kronecker(spec: StudentSpec) -> bool:
    """Whether the student's compressed layers are Kronecker factors (not truncation, not truncated SVDs)."""
    return spec.keep_layers is None and spec.budget_families != ("svd",)


def kronecker_at_ffn2x(rows: dict[str, dict]) -> list[str]:
    """The measured Kronecker students at ``ffn2x``'s parameter count (its config, or a budget on it)."""
    return [name for name, spec in STUDENTS.items()
            if name in rows and is_kronecker(spec) and spec.compression == STUDENTS["ffn2x"].compression]


def still_improving(row: dict) -> bool:
    """Whether a teacher row's held-out F1 was best at its last validation (more epochs may pay)."""
    curve = row.get("curve") or []
    return bool(curve) and row["teacher"]["selection"].get("step") == curve[-1]["step"]


def setting_of(row: dict) -> TeacherSetting:
    """The search point a teacher row was trained at (its name says whether it had its own epoch count)."""
    plain = TeacherSetting(row["lr"], row["max_length"], row["doc_stride"])
    return plain if plain.name == row["name"] else TeacherSetting(row["lr"], row["max_length"], row["doc_stride"], row["epochs"])
