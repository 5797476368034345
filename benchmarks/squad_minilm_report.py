"""The page of the SQuAD benchmark (docs/benchmarks/squad_minilm.md) from its result rows: the goals
and the papers' claims, the teacher search, the students, what is still missing, how to reproduce
it. benchmarks/squad_minilm.py runs the rows and calls :func:`write_reports`."""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence

from squad_minilm_rows import (
    REPO,
    REPORT,
    STUDENT_KEYS,
    STUDENTS,
    TEACHER_KEYS,
    chosen_teacher,
    held_out_f1,
    is_kronecker,
    kronecker_at_ffn2x,
    setting_of,
    still_improving,
)

from squad_minilm_scores import paired_difference, separated, separation

from kronlm.bench.markdown import markdown_table, reproduce_section, write_markdown
from kronlm.bench.plots import line_plot, png_beside
from kronlm.tasks.squad import LOCAL_SQUAD_DIR

# The project's goals for this benchmark (F1 in percent on dev.json; retention = student F1 / teacher F1).
TEACHER_GOAL_F1 = 60.0
FFN2X_GOAL = 0.95
KB8_STAGE1_GOAL = 0.80
# Figures of the first round (docs/benchmarks/squad_minilm_first.md), shown until a row replaces them.
PREVIOUS_ROUND = {
    "teacher": "teacher: MiniLM fine-tuned for 1 epoch on 2,696 of the 5,696 training questions (a seeded 3,000, "
               "304 held out): dev EM 31.19 / F1 46.18",
    "kb8": "kb8: the KroneckerBERT8-shaped student of that round's teacher (dev F1 46.18), 1 epoch of task ILKD on "
           "the same 2,696 questions, no stage 1: dev EM 1.43 / F1 8.64 (18.7 % of its teacher's F1)",
}


def pct(fraction: float | None) -> str:
    """A fraction as a percent with 2 decimals, or "-"."""
    return "-" if fraction is None else f"{100 * fraction:.2f}"


def minutes(seconds: float | None) -> str:
    """Seconds as minutes with 1 decimal, or "-"."""
    return "-" if not seconds else f"{seconds / 60:,.1f}"


SEARCHES = {
    "coordinate": "every learning rate at the first window (max length, doc stride), then the one with the best held-out F1 "
                  "there at each other window (`--teacher-search coordinate`)",
    "grid": "every pair of learning rate and window (`--teacher-search grid`)",
}
# The search's last step, said after either search's description.
LONGER = ("; then, when the best of those still had its best held-out F1 at its last epoch, the same setting trained again "
          "with more epochs (`--teacher-more-epochs`, row name ending `-E` and that count)")


def teacher_section(rows: dict[str, dict], grid: list[str], chosen: dict | None, png: str | None,
                    search: str = "coordinate", pending: Sequence[str] = ()) -> list[str]:
    """The teacher settings tried (``grid``: row names; ``search``: a key of :data:`SEARCHES`):
    held-out F1 / EM after each epoch, the best epoch, dev scores of the kept checkpoint."""
    measured = [rows[name] for name in grid if name in rows]
    measured += [r for r in rows.values() if r["kind"] == "teacher" and r not in measured]
    lines = ["## Teacher", ""]
    if not measured:
        return lines + ["No teacher measured yet.", ""]
    table = []
    for r in measured:
        curve = " / ".join(f"{pct(p['f1'])} ({pct(p['exact_match'])})" for p in r["curve"])
        sel = r["teacher"]["selection"]
        best = kept_point(r)
        mark = " **(chosen)**" if chosen is not None and r["name"] == chosen["name"] else ""
        mark += "" if r["name"] in grid else " (outside the search)"
        table.append([f"`{r['name']}`{mark}", f"{r['lr']:g}", r["max_length"], r["doc_stride"], curve or "-",
                      "-" if best is None else f"{best['epoch']:g}", pct(sel.get("value")),
                      pct(r["teacher"]["metrics"].get("exact_match")), pct(r["teacher"]["metrics"].get("f1")),
                      minutes(r["teacher"]["train_seconds"]) + (" (resumed)" if r.get("resumed") else "")])
    lines += [markdown_table(["setting", "lr", "max length", "doc stride", "held-out F1 (EM) after each epoch", "best epoch",
                              "held-out F1, best", "dev EM", "dev F1", "train (min)"], table), "",
              f"Settings tried: {SEARCHES[search]}{LONGER}"
              + ("; besides, settings outside the search (run by name, `--only NAME`), marked so, which compete with the "
                 "others for the students' teacher" if any(r["name"] not in grid for r in measured) else "")
              + ". Held-out: 10 % of train.json's questions in whole paragraphs (the same "
              "for every row), never trained on. The students learn from the setting whose best epoch has the best "
              "held-out F1; dev.json is the kept (best) checkpoint's, reported only.", ""]
    lines += search_outcome(rows, grid, chosen, pending)
    if png:
        lines += [f"![held-out F1 of each teacher setting after each epoch]({png})", ""]
    return lines


def kept_point(row: dict) -> dict | None:
    """The point of a teacher row's held-out curve at its kept (best) checkpoint, or None."""
    step = row["teacher"]["selection"].get("step")
    return next((p for p in row["curve"] if p["step"] == step), None)


def search_outcome(rows: dict[str, dict], grid: list[str], chosen: dict | None, pending: Sequence[str] = ()) -> list[str]:
    """One paragraph once the search is done (every setting of ``grid`` measured, nothing
    ``pending``): its best setting, whether that one earned a longer run, and which row the students
    learn from; nothing before."""
    if chosen is None or pending or not grid or any(name not in rows for name in grid):
        return []
    best = max((rows[name] for name in grid), key=held_out_f1)
    point = kept_point(best)
    text = (f"Outcome: the search's best setting is `{best['name']}`, held-out F1 {pct(best['teacher']['selection'].get('value'))}"
            + ("" if point is None else f" after epoch {point['epoch']:g} of {len(best['curve'])}"))
    if not any(setting_of(rows[name]).epochs for name in grid):  # no longer run among the searched rows
        text += (", still rising at its last epoch but no longer run asked for" if still_improving(best)
                 else ", past its peak before its last epoch, so no longer run was needed")
    if chosen["name"] == best["name"]:
        text += "; the students learn from it."
    else:
        text += (f"; the students learn from `{chosen['name']}`, outside the search, whose held-out F1 is higher "
                 f"({pct(chosen['teacher']['selection'].get('value'))}).")
    return [text, ""]


def retention(row: dict) -> float | None:
    """A student row's dev F1 over its teacher's (a fraction), or None when the teacher's F1 is 0."""
    teacher_f1 = row["teacher"]["metrics"].get("f1")
    return row["student"]["metrics"]["f1"] / teacher_f1 if teacher_f1 else None


def student_cells(r: dict, chosen: dict | None) -> list:
    """One student table row: dev scores, sizes, ratios, retention, the held-out score that chose it, times."""
    s, t = r["student"], r["teacher"]
    kept = retention(r)
    sel = s["selection"]
    choice = (f"{pct(sel.get('value'))} (step {sel.get('step')} of {sel.get('max_steps')})" if sel.get("checkpoint") == "best"
              else sel.get("checkpoint", "-"))
    stage1 = r.get("stage1") or {}
    stale = "" if chosen is None or r["teacher_name"] == chosen["name"] else f" (teacher `{r['teacher_name']}`)"
    return [f"`{r['name']}`{stale}", pct(s["metrics"].get("exact_match")), pct(s["metrics"].get("f1")),
            "-" if kept is None else f"{100 * kept:.1f} %", f"{s['params']:,}", f"{t['params'] / s['params']:.2f}x",
            f"{r['teacher_linear_params'] / r['linear_params']:.2f}x", f"{r['lr']:g}" if r.get("lr") else "-", choice, f"{s['train_seconds']:,.0f}",
            f"{stage1['train_seconds']:,.0f}" if stage1 else "-", gigabytes(r.get("peak_memory"))]


# How each peak_memory method reads in the report.
MEMORY_METHODS = {
    "peak RSS (VmHWM after clear_refs)": "the process's peak resident set during the row's last call (teacher, student, "
                                         "data and Python included; `VmHWM`, reset at the call's start)",
    "cuda max_memory_allocated": "the GPU allocator's peak of live tensors during the row's last call",
    "ru_maxrss (process lifetime)": "the process's peak resident set since it started (`ru_maxrss`)",
}


def gigabytes(memory: dict | None) -> str:
    """A row's ``peak_memory`` ({"bytes", "method"}) in GB (10^9 bytes) with 1 decimal, or "-"."""
    return "-" if not memory else f"{memory['bytes'] / 1e9:.1f}"


def goals_section(rows: dict[str, dict], chosen: dict | None, unmeasured: int) -> list[str]:
    """The project's goals for this benchmark, each with its status from the rows (``unmeasured``:
    teacher settings of the grid without a row)."""
    def kept(name):
        return None if name not in rows else retention(rows[name])

    teacher_f1 = None if chosen is None else 100 * chosen["teacher"]["metrics"]["f1"]
    s1, kb8 = kept("kb8-s1"), kept("kb8")
    two = [name for name in kronecker_at_ffn2x(rows) if kept(name) is not None]
    best = max(two, key=kept, default=None)
    status = []
    status.append("not measured yet" if teacher_f1 is None else f"{'met' if teacher_f1 >= TEACHER_GOAL_F1 else 'missed'}: F1 "
                  f"{teacher_f1:.2f}" + (f" (so far: {unmeasured} teacher setting(s) of the search not measured yet)" if unmeasured else ""))
    status.append("not measured yet" if not kronecker_at_ffn2x(rows) else "undefined (teacher F1 0)" if best is None
                  else f"{'met' if kept(best) >= FFN2X_GOAL else 'missed'}: " + ", ".join(
                      f"`{name}` {100 * kept(name):.1f} %" for name in sorted(two, key=kept, reverse=True)))
    status.append("not measured yet" if "kb8-s1" not in rows else "undefined (teacher F1 0)" if s1 is None
                  else f"{'met' if s1 >= KB8_STAGE1_GOAL else 'missed'}: {100 * s1:.1f} %")
    if "kb8-s1" not in rows or "kb8" not in rows:
        status.append("not measured yet")
    elif s1 is None or kb8 is None:
        status.append("undefined (teacher F1 0)")
    else:
        status.append(f"{'holds' if s1 > kb8 else 'does not hold'}: {100 * s1:.1f} % with stage 1, {100 * kb8:.1f} % without"
                      + paired_note(rows, "kb8-s1", "kb8"))
    return ["## Goals", "",
            "The project's goals for this benchmark (F1 on dev.json; retention = a student's F1 / its teacher's F1):", "",
            f"- Teacher F1 ≥ {TEACHER_GOAL_F1:g} on dev.json: {status[0]}.",
            f"- A Kronecker student at the FFN-only 2x parameter count (`ffn2x` and the budget students of its count) keeps "
            f"≥ {100 * FFN2X_GOAL:g} % of the teacher's F1: {status[1]}.",
            f"- The KroneckerBERT8 student with stage 1 (`kb8-s1`) keeps ≥ {100 * KB8_STAGE1_GOAL:g} %: {status[2]}.",
            f"- KroneckerBERT's ablation, `kb8-s1` above the same student without stage 1 (`kb8`): {status[3]}.", "",
            *claims_lines(rows)]


def pair_scores(rows: dict[str, dict], a: str, b: str) -> tuple[list[float], list[float]] | None:
    """The per-question dev F1 of rows ``a`` and ``b``, or None unless both are measured and hold them."""
    scores = [rows.get(name, {}).get("dev_f1_questions") for name in (a, b)]
    return None if None in scores else (scores[0], scores[1])


def paired_note(rows: dict[str, dict], a: str, b: str) -> str:
    """" (difference ..., paired standard error ...: separated)" for rows ``a`` - ``b``, or "" without their scores."""
    scores = pair_scores(rows, a, b)
    return "" if scores is None else f" ({separation(*scores)})"


def claims_lines(rows: dict[str, dict]) -> list[str]:
    """The papers' claim against the same-size baselines, from the rows measured so far: a Kronecker
    student above the low-rank students of its parameter count (``lowrank2x`` and its other
    recipes), and above the truncated one (``truncated3``) at no less compression. Each side is the
    row whose kept checkpoint has the best held-out F1, so no recipe is chosen on dev.json."""
    def f1(name):
        return 100 * rows[name]["student"]["metrics"]["f1"]

    def held_out(name):
        value = rows[name]["student"]["selection"].get("value")
        return float("-inf") if value is None else 100 * value

    def ratio(name):
        return rows[name]["teacher"]["params"] / rows[name]["student"]["params"]

    kron = [name for name, spec in STUDENTS.items() if is_kronecker(spec) and name in rows]
    lines = ["The papers' claim, a Kronecker student above a baseline of the same size (each side: the row with the best "
             "held-out F1, so no recipe is chosen on dev.json):", ""]
    same = kronecker_at_ffn2x(rows)
    low = [name for name, spec in STUDENTS.items() if name in rows and spec.budget_families == ("svd",)]
    if not low or not same:
        lines.append("- Against truncated SVDs at `ffn2x`'s parameter count (`lowrank2x`): not measured yet.")
    else:
        best, base = max(same, key=held_out), max(low, key=held_out)
        lines.append(f"- Against truncated SVDs at `ffn2x`'s parameter count: {'holds' if f1(best) > f1(base) else 'does not hold'}: "
                     f"the Kronecker student `{best}` (held-out F1 {held_out(best):.2f}) scores dev F1 {f1(best):.2f}, the "
                     f"low-rank one `{base}` (held-out F1 {held_out(base):.2f}) {f1(base):.2f}{paired_note(rows, best, base)}.")
    smaller = [name for name in kron if "truncated3" in rows and ratio(name) >= ratio("truncated3")]
    if not smaller:
        lines.append("- Against dropping layers (`truncated3`), Kronecker students compressed at least as much: not measured yet.")
    else:
        best = max(smaller, key=held_out)
        larger = [f"`{n}` ({ratio(n):.2f}x) {f1(n):.2f}" for n in kron if n not in smaller]
        lines.append(f"- Against dropping layers (`truncated3`, {ratio('truncated3'):.2f}x, dev F1 {f1('truncated3'):.2f}), Kronecker "
                     f"students compressed at least as much: {'holds' if f1(best) > f1('truncated3') else 'does not hold'}: the "
                     f"best of them, `{best}` ({ratio(best):.2f}x, held-out F1 {held_out(best):.2f}), scores dev F1 {f1(best):.2f}"
                     + paired_note(rows, best, "truncated3") + (f"; less compressed (dev F1): {', '.join(larger)}." if larger else "."))
    return [*lines, ""]


# The pairs of students the paired-comparison table states (A, B: the difference is A - B): the
# claims' and the ablation's, then what separates the 2x students (init, shapes, family, learning rate).
PAIRS = [("kb8-s1", "kb8"), ("ffn2x", "truncated3"), ("kb8-s1", "truncated3"), ("kron2x-budget", "lowrank2x"),
         ("kron2x-budget", "lowrank2x-lr5e-5"), ("kron2x-budget-lr5e-5", "lowrank2x-lr5e-5"), ("ffn2x-aa", "ffn2x"),
         ("kron2x-budget", "ffn2x-aa"), ("kron2x-budget", "kron2x-budget-lr5e-5"), ("lowrank2x-lr5e-5", "lowrank2x")]


def paired_section(rows: dict[str, dict]) -> list[str]:
    """The table of :data:`PAIRS` whose two rows both hold per-question dev F1 (none: no section)."""
    table = []
    for a, b in PAIRS:
        scores = pair_scores(rows, a, b)
        if scores is None:
            continue
        diff, se = paired_difference(*scores)
        table.append([f"`{a}`", f"`{b}`", pct(rows[a]["student"]["metrics"]["f1"]), pct(rows[b]["student"]["metrics"]["f1"]),
                      f"{diff:+.2f}", f"{se:.2f}", "separated" if separated(diff, se) else "not separated"])
    if not table:
        return []
    return ["## Paired comparisons", "",
            "Two students answer the same dev questions, so the standard error of their mean per-question F1 difference "
            "says whether a gap exceeds what the choice of questions alone produces (separated: more than two standard "
            "errors). Each row is one training seed; seed-to-seed variation comes on top and is not measured.", "",
            markdown_table(["A", "B", "dev F1 A", "dev F1 B", "A - B (F1)", "paired standard error", "verdict"], table), ""]


def missing_rows(rows: dict[str, dict], grid: list[str], command_base: str, pending: Sequence[str] = ()) -> list[str]:
    """The "Not measured yet" lines: each missing row (teacher names, the teacher settings the
    search has not decided yet, then students) with the invocation that measures it."""
    lines = [f"- `{name}`: `{command_base} --only {name}`" for name in grid if name not in rows]
    lines += [f"- teacher: {what}: `{command_base} --only teacher`" for what in pending]
    lines += [f"- `{name}`: `{command_base} --only {name}`" for name in STUDENTS if name not in rows]
    if not lines:
        return []
    return ["## Not measured yet", "",
            "Each is one invocation (students need every teacher row first, except kb8-s1's stage 1, which `--only stage1` "
            "runs beside them; an interrupted row resumes from its checkpoints):", "", *lines, ""]


def settings_lines(rows: dict[str, dict]) -> list[str]:
    """What the rows were trained with: subsets, epochs, batch, precision, device."""
    lines = []
    for kind, keys in (("teacher", TEACHER_KEYS), ("student", STUDENT_KEYS)):
        of_kind = [r for r in rows.values() if r["kind"] == kind]
        if of_kind:
            s = {k: v for r in of_kind for k, v in r["settings"].items()}  # the rows agree (check_rows_match)
            shown = ", ".join(f"{k.replace('_', ' ')} {'all' if s.get(k) is None and k.endswith('questions') else s.get(k)}"
                              for k in keys if k in s)
            devices = sorted({r["environment"]["device"] for r in of_kind})
            lines.append(f"- {kind} rows: {shown}; device {', '.join(devices)}.")
    return lines


def subset_warning(rows: dict[str, dict]) -> list[str]:
    """A warning paragraph when any row trained or was scored on a subset of the questions (smoke runs)."""
    subsets = sorted({f"{key.replace('_', ' ')} {r['settings'][key]}" for r in rows.values()
                      for key in ("train_questions", "dev_questions") if r["settings"].get(key) is not None})
    if not subsets:
        return []
    return [f"**Subsets.** Rows below used {', '.join(subsets)} (`--train-questions` / `--dev-questions`): smoke-run "
            "figures, not the benchmark's.", ""]


def rerun_command(rows: dict[str, dict], default: str) -> str:
    """The invocation of the latest row without ``--only``, ``--out``, ``--report-only`` and ``--question-scores``: the base
    of the commands that measure the missing rows with the same settings (``default`` without rows)."""
    if not rows:
        return default
    argv, kept = shlex.split(list(rows.values())[-1]["command"]), []
    skip = False
    for token in argv:
        if skip:
            skip = False
        elif token in ("--only", "--out"):
            skip = True
        elif token not in ("--report-only", "--question-scores") and not token.startswith(("--only=", "--out=")):
            kept.append(token)
    return shlex.join(kept)


def report_markdown(rows: dict[str, dict], grid: list[str], command_base: str, png: str | None, out: str = REPORT,
                    pending: Sequence[str] = (), search: str = "coordinate", student_png: str | None = None) -> str:
    """The whole report (Markdown) of the rows measured so far; ``png`` / ``student_png``: the
    file names of the teachers' and the students' held-out curves (None: not drawn); ``grid``:
    the teacher row names the search has decided; ``pending``: the teacher settings it has not decided yet
    (:func:`pending_settings`); ``search``: how they were chosen (a key of :data:`SEARCHES`); ``command_base``: the command the missing rows are run with when no
    row records one (:func:`rerun_command`); ``out``: the report's path in its ``--report-only`` command."""
    chosen = chosen_teacher(rows)
    command_base = rerun_command(rows, command_base)
    unmeasured = sum(name not in rows for name in grid) + len(pending)
    students = [rows[name] for name in STUDENTS if name in rows]
    lines = ["# SQuAD v1.1: a MiniLM teacher and Kronecker students (KroneckerBERT's claims)", "",
             f"**Data.** `{LOCAL_SQUAD_DIR}`: the official SQuAD v1.1 *dev* set split by article (train.json: 24 articles, "
             "5,696 questions; dev.json: 8 articles, 1,539 questions). The figures are **not comparable with published "
             "SQuAD dev numbers**: no model saw the official training set, and dev.json is 8 of dev's 48 articles.", "",
             "**Split discipline.** Every setting and checkpoint is chosen on held-out training questions (10 % of "
             "train.json, whole paragraphs, seeded; the same for every row); dev.json is evaluated and reported only.", "",
             *subset_warning(rows), *goals_section(rows, chosen, unmeasured), *teacher_section(rows, grid, chosen, png, search, pending),
             "## Students", ""]
    if students:
        lines += [markdown_table(["student", "dev EM", "dev F1", "retention (F1)", "params", "ratio (whole)", "ratio (linear layers)",
                                  "peak lr", "held-out F1 that chose it", "train (s)", "stage 1 (s)",
                                  "peak memory (GB)"],
                                 [student_cells(r, chosen) for r in students]), ""]
        if student_png:
            lines += [f"![held-out F1 of each student during task distillation, by step]({student_png})", ""]
    else:
        lines += ["No student measured yet.", ""]
    lines += ["Students (each from the chosen teacher, task ILKD of KroneckerBERT with `configs/squad-minilm-student.yaml` at "
              "the teacher's max length and doc stride: embedding, attention-score and hidden MSE, KD on the start and end "
              "logits, CE on the gold span):", "", *[f"- `{s.name}`: {s.what}." for s in STUDENTS.values()], "",
              "Ratios are the teacher's parameters over the student's: whole QA model, and the linear layers of the "
              "encoder (biases included; embeddings, head apart). Train (s): wall seconds of the task-distillation run, "
              "summed over its calls when resumed (the time between an interruption and the checkpoint before it is "
              "not counted); stage 1: of the general distillation. Peak memory: " + "; ".join(
                  [*(MEMORY_METHODS.get(m, m) for m in sorted({r["peak_memory"]["method"] for r in students if r.get("peak_memory")})),
                   "'-': measured before the benchmark recorded it."]), ""]
    lines += paired_section(rows)
    previous = [text for key, text in PREVIOUS_ROUND.items()
                if (key == "teacher" and chosen is None) or (key != "teacher" and key not in rows)]
    if previous:
        lines += ["## Previous round", "", "Measured before this benchmark's protocol, on a 3,000-question subset "
                  "([squad_minilm_first.md](squad_minilm_first.md)); shown until a row above replaces it:", "",
                  *[f"- {t}." for t in previous], ""]
    lines += missing_rows(rows, grid, command_base, pending)
    settings = settings_lines(rows)
    if settings:
        lines += ["## Settings", "", *settings, ""]
    runs = sorted({r["command"] for r in rows.values()})
    notes = [f"`{r['name']}`: {r['environment']['date']}, device {r['environment']['device']}, torch threads "
             f"{r['environment']['threads']}, commit `{r['environment']['commit']}`, {minutes(r['wall_seconds'])} min wall, "
             f"{minutes(r['cpu_seconds'])} CPU-min" for r in rows.values()]
    runs = runs or [f"{command_base} --only teacher", f"{command_base} --only students"]
    if any(r.get("dev_f1_questions") is not None for r in students):
        runs.append(f"{command_base} --question-scores --out {out}")  # rows recorded before their runs scored each question
    lines.append(reproduce_section([*runs, f"{command_base} --report-only --out {out}"], notes=notes))
    return "\n".join(lines) + "\n"


def write_reports(rows: dict[str, dict], grid: list[str], args, command_base: str, pending: Sequence[str] = ()) -> None:
    """The report to ``--out`` (and beside it, as PNG, the teachers' held-out F1 per epoch and,
    as ``NAME-students.png``, the students' per step), else to stdout; ``grid``:
    the teacher row names the search has decided, ``pending``: the settings it has not."""
    png = None
    teachers = [r for r in rows.values() if r["kind"] == "teacher" and r["curve"]]
    if args.out is not None and teachers:
        png_path = png_beside(args.out)
        line_plot({r["name"]: ([p["epoch"] for p in r["curve"]], [100 * p["f1"] for p in r["curve"]]) for r in teachers},
                  png_path, title="SQuAD v1.1: MiniLM teacher, held-out F1 per epoch", xlabel="epoch",
                  ylabel="held-out F1 (%)", reference=TEACHER_GOAL_F1, reference_label=f"goal on dev.json ({TEACHER_GOAL_F1:g})")
        png = png_path.name
    student_png = None
    students = [r for r in rows.values() if r["kind"] == "student" and r.get("curve")]
    if args.out is not None and students:
        path = args.out.with_name(f"{args.out.stem}-students.png")
        chosen = chosen_teacher(rows)
        best = held_out_f1(chosen) if chosen is not None else float("-inf")
        line_plot({r["name"]: ([p["step"] for p in r["curve"]], [100 * p["f1"] for p in r["curve"]]) for r in students},
                  path, title="SQuAD v1.1: MiniLM students, held-out F1 during task distillation", xlabel="step",
                  ylabel="held-out F1 (%)", reference=100 * best if math.isfinite(best) else None,
                  reference_label="the teacher's held-out F1")
        student_png = path.name
    out = REPORT if args.out is None else args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out
    text = report_markdown(rows, grid, command_base, png, str(out), pending, args.teacher_search, student_png)
    if args.out is None:
        print(text)
    else:
        print(f"report -> {write_markdown(text, args.out)}"
              + "".join(f", {args.out.with_name(name)}" for name in (png, student_png) if name))
