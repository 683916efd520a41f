"""One figure per dataset: test IoU against labeled images (log x), one line per arm with its 95% interval; the
pseudo-mask floor and the zero-shot models (also the init weights' pretraining) as dashed lines, the study's recipes
dash-dotted with hollow markers; a second panel per cross-site evaluation. And one figure per dataset for the
``suggest`` strategies: each one's paired difference from random picks."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from medsass.atomic import atomic_open
from medsass.trainer.study.jobs import strategy_targets
from medsass.trainer.study.spec import arm_label, budget_count, recipe_arm
from medsass.trainer.study.stats import MIN_SEEDS_BOLD

if TYPE_CHECKING:
    from medsass.trainer.study.jobs import StudyData
    from medsass.trainer.study.report import Index
    from medsass.trainer.study.spec import Study

# (colour, marker) per fine-tuned arm; the dashed no-label lines have their own colours (LINE_COLORS)
STYLE = {"scratch": ("tab:gray", "o"), "end_to_end": ("tab:red", "s"), "encoder_only": ("tab:orange", "^"),
         "ssl": ("tab:blue", "D"), "weights": ("tab:olive", "P"), "weights_end_to_end": ("tab:cyan", "X")}
FALLBACK = ("tab:green", "v")  # an arm without a style of its own
LINE_COLORS = {"floor": "black", "zero_shot": "tab:purple", "weights_zero_shot": "tab:brown"}
# the other pseudo-mask targets (dotted): one colour each, for their fine-tuned lines and their no-label lines
TARGET_COLORS = ("tab:green", "tab:pink", "tab:cyan", "tab:olive", "tab:brown")


def target_color(d: StudyData, target: str) -> str:
    """The colour of a pseudo-mask target other than the main one."""
    others = [t for t in d.stores if t != d.main_target]
    return TARGET_COLORS[others.index(target) % len(TARGET_COLORS)]


def plot_dataset(study: Study, d: StudyData, idx: Index, budgets: dict[int, list[str]], path: Path) -> bool:
    import matplotlib  # lazy: pyplot takes ~0.7 s to import, and its backend is chosen here, when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wheres = ["test"] + [f"site:{s}" for s in d.sites]
    fig, axes = plt.subplots(1, len(wheres), figsize=(6.5 * len(wheres), 4.5), squeeze=False)
    drawn = False
    lines = [(a, d.main_target) for a in ["scratch", *[a for a in study.arms if a != "scratch"]]]
    lines += [(a, t) for t in list(d.stores)[1:] for a in study.other_targets.arms]
    lines += [(recipe_arm(a, r.name), t) for r in study.recipes if not r.datasets or d.name in r.datasets
              for a in r.arms for t in (r.targets or [d.main_target])]  # a recipe's runs: dash-dot
    for ax, where in zip(axes[0], wheres):
        for i, (arm, target) in enumerate(lines):
            pts = [(n, idx.arm((d.name, where, target, arm, n, 1), study.bootstrap)) for n in sorted(budgets)]
            pts = [(n, e) for n, e in pts if e is not None]
            if not pts:
                continue
            color, marker = STYLE.get(arm.partition("+")[0], FALLBACK)
            if target != d.main_target:
                color = target_color(d, target)
            ls = "-." if "+" in arm else "-" if target == d.main_target else ":"
            xs = [n for n, _ in pts]
            ax.plot(xs, [e.mean for _, e in pts], ls, color=color, marker=marker, label=arm_label(arm, target, d.main_target),
                    markerfacecolor="none" if "+" in arm else color)  # a recipe: hollow markers
            ax.fill_between(xs, [e.lo for _, e in pts], [e.hi for _, e in pts], color=color, alpha=0.15)
            drawn = True
        for target in d.stores:  # the main target's no-label lines dashed, the other targets' dotted
            for arm, color in LINE_COLORS.items():
                e = idx.arm((d.name, where, target, arm, 0, 1), study.bootstrap)
                if e is not None and not (arm == "floor" and target in d.pool_extra):  # pooled: the same masks' floor
                    main = target == d.main_target
                    ax.axhline(e.mean, color=color if main else target_color(d, target), lw=1,
                               ls="--" if main else ((0, (1, 1)) if arm == "floor" else (0, (4, 1, 1, 1))),
                               label=f"{arm_label(arm, target, d.main_target)} (no labels)")
        ax.set_xscale("log")
        ax.set_xlabel("labeled training images")
        ax.set_ylabel("micro IoU")
        ax.set_title(f"{d.name}: {'test split' if where == 'test' else where[5:] + ' (another site)'}")
        ax.grid(alpha=0.3)
    named: dict[str, object] = {}  # one legend under the panels (inside them it hid the lines)
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            named.setdefault(label, handle)
    if drawn:
        rows = -(-len(named) // 3)
        fig.set_size_inches(6.5 * len(wheres), 4.5 + 0.22 * rows)
        fig.legend(list(named.values()), list(named), loc="lower center", ncol=3, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.22 * rows / (4.5 + 0.22 * rows) + 0.01, 1, 1))
        with atomic_open(path) as fh:
            fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    return drawn


STRATEGY_STYLE = {"diverse": ("tab:blue", "D"), "uncertain": ("tab:red", "s"), "hybrid": ("tab:purple", "^"),
                  "random": ("tab:gray", "o")}  # random: suggest's own random order, against the arm's random subset


def plot_strategies(study: Study, d: StudyData, idx: Index, path: Path) -> bool:
    """Which images to label: each ``suggest`` strategy's end-to-end model minus the arm's random subset (paired by
    seed, same start; 95% interval), against labeled images (log x); one panel per evaluation. Hollow markers: fewer
    than three seeds (the interval leaves out training randomness). False where there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = study.strategies
    if not st or (st.datasets and d.name not in st.datasets):
        return False
    ns = sorted({budget_count(b, d.n_labeled_train) for b in st.budgets})
    wheres = ["test"] + [f"site:{s}" for s in d.sites]
    fig, axes = plt.subplots(1, len(wheres), figsize=(6.5 * len(wheres), 4.2), squeeze=False)
    drawn = False
    for ax, where in zip(axes[0], wheres):
        for t_i, target in enumerate(strategy_targets(st, d)):
            for s_i, name in enumerate(st.names):
                key = lambda arm, n: (d.name, where, target, arm, n, 1)  # noqa: E731
                pts = [(n, idx.diff(key(f"strategy:{name}", n), key("end_to_end", n), study.bootstrap)) for n in ns]
                pts = [(n * 1.06 ** (s_i - (len(st.names) - 1) / 2), e) for n, e in pts if e is not None]
                if not pts:
                    continue
                color, marker = STRATEGY_STYLE.get(name, ("tab:green", "v"))
                label = name if target == d.main_target else f"{name} ({target})"
                xs, means = [x for x, _ in pts], [e.mean for _, e in pts]
                ax.plot(xs, means, "-" if t_i == 0 else ":", color=color, label=label)  # a second target: dotted
                for x, e in pts:
                    ax.errorbar([x], [e.mean], yerr=[[e.mean - e.lo], [e.hi - e.mean]], color=color, marker=marker,
                                capsize=3, markerfacecolor=color if e.n_seeds >= MIN_SEEDS_BOLD else "none")
                drawn = True
        ax.axhline(0.0, color="black", lw=1)
        ax.set_xscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("labeled training images (picked by the strategy)")
        ax.set_ylabel("micro IoU: strategy − random picks")
        ax.set_title(f"{d.name}: {'test split' if where == 'test' else where[5:] + ' (another site)'}")
        ax.grid(alpha=0.3)
    if drawn:
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        with atomic_open(path) as fh:
            fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    return drawn
