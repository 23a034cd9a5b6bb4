"""The seed papers' headline claims against our figures on the closest models we have offline.

For each technique: the paper's claim, our figure, a 95% interval, a verdict. Intervals come from
a two-level bootstrap (2,000 resamples): the seeds (device draws and, where the method is random,
the method's own seed) and the test samples are resampled together, so both chance factors are in
them. Hardware: 128 x 128 crossbars, 8-bit weights and cells, dual array, wire resistance
r_wire 2 ohm per segment and lognormal programming variation sigma 0.05 unless named; the
shipped digits models (450 test digits) and the MNIST CNN (1,000 real test digits).

    pip install -e ".[test,train]"      # matplotlib; torch for the WCT rows
    python docs/studies/seeds.py        # writes seeds.md here
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import xcompile
from xcompile.data import builtin_split
from xcompile.reprogramming import writes_by_slice_and_magnitude
from xcompile.runtime.session import Session

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent.parent / "models"
HARDWARE = {"rows": 128, "cols": 128, "r_wire": 2.0, "variation": "lognormal", "sigma": 0.05}
DEVICE_SEEDS = (1, 2, 3, 4, 5)
TRAINING_SEEDS = (0, 1, 2)
STUCKING_SEEDS = (0, 1, 2)
BOOTSTRAP = 2000
DATASET = {"digits_cnn": "digits", "digits_cnn_pruned": "digits", "mnist_cnn": "mnist"}


def correct(model, dataset: str, seeds=DEVICE_SEEDS, compile_options=None, **hardware) -> np.ndarray:
    """[seeds, samples] booleans: sample classified right on the crossbars with that device seed.
    `model`: an ONNX model (compiled here with the options and hardware) or a compiled mapping."""
    x, y = builtin_split(dataset, "test")
    calibration = builtin_split(dataset, "calib")[0]
    mapping = model if isinstance(model, xcompile.Mapping) else xcompile.compile_model(
        model, progress=False, calibration=dataset, **(compile_options or {}), **hardware)
    name = Session(mapping).get_inputs()[0].name
    rows = []
    for seed in seeds:
        session = Session(mapping, seed=seed, calibration={name: calibration})
        rows.append(np.concatenate([session.run(None, {name: x[i : i + 256]})[0].argmax(1) for i in range(0, len(x), 256)]) == y)
    return np.array(rows)


def float_correct(model, dataset: str) -> np.ndarray:
    x, y = builtin_split(dataset, "test")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1) == y


def bootstrap(statistic, *tables: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """statistic(*tables) and its 95% interval; every table is [seeds, samples] (or [samples]) and
    all are resampled with the same seed and sample indices."""
    rng = np.random.default_rng(seed)
    samples = tables[0].shape[-1]
    seeds = max(t.shape[0] if t.ndim == 2 else 1 for t in tables)
    values = []
    for _ in range(BOOTSTRAP):
        s, n = rng.integers(0, seeds, seeds), rng.integers(0, samples, samples)
        values.append(statistic(*[t[s][:, n] if t.ndim == 2 else t[n] for t in tables]))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(statistic(*tables)), float(low), float(high)


def drop(float_ok, crossbar_ok) -> float:
    return float(float_ok.mean() - crossbar_ok.mean())


def recovery(float_ok, mapped_ok, mode_ok) -> float:
    lost = drop(float_ok, mapped_ok)
    return (lost - drop(float_ok, mode_ok)) / lost if lost > 0 else 0.0


def verdict(low: float, high: float, claim: float) -> str:
    """Reproduced if the interval reaches the paper's recovery; partly if it is above zero only."""
    if low <= 0:
        return "**not reproduced**: no recovery within the interval"
    if high >= claim:
        return f"**reproduced**: recovery above zero, the paper's {claim:.0%} within or below the interval"
    return f"**partly**: recovery above zero, the paper's {claim:.0%} above the interval"


def x_changr(lines: list[str]) -> None:
    lines += [
        "## X-CHANGR (Agrawal et al. 2019): static and dynamic output remapping against line resistance",
        "",
        "Claim: on VGG16 / CIFAR-10 the accuracy drop from line resistance, 5.6% as mapped, falls to 2.9% with the "
        "static remapping strategy (48% of the drop recovered) and to 2.1% with the dynamic one (62%).",
        "",
        "| model, hardware | float | drop as mapped (points) | mode | drop (points) | recovered [95% interval] | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    settings = [("digits_cnn", HARDWARE, "r_wire 2"), ("digits_cnn", {**HARDWARE, "r_wire": 1.0}, "r_wire 1"), ("mnist_cnn", HARDWARE, "r_wire 2"),
                ("mnist_cnn", {**HARDWARE, "r_wire": 1.0}, "r_wire 1")]
    for model, hardware, label in settings:
        dataset = DATASET[model]
        path = MODELS / f"{model}.onnx"
        ok_float = float_correct(path, dataset)
        mapped = correct(path, dataset, **hardware)
        for remap, claim in (("static", 0.48), ("chain", 0.48), ("dynamic", 0.62)):
            mode = correct(path, dataset, compile_options={"remap": remap}, **hardware)
            value, low, high = bootstrap(lambda f, m, r: recovery(f, m, r), ok_float, mapped, mode)
            name = f"{remap} (ours)" if remap == "chain" else remap
            lines.append(
                f"| {model}, {label} | {ok_float.mean():.2%} | {100 * drop(ok_float, mapped):.2f} | {name} | {100 * drop(ok_float, mode):.2f} | "
                f"{value:.0%} [{low:.0%}, {high:.0%}] | {verdict(low, high, claim)} |"
            )
            print(lines[-1], flush=True)
    lines += [
        "",
        "The dynamic search is deterministic (its transpositions are seeded by the compiler), so only the device seeds "
        "and the test digits vary. Chain is our variant, listed against the static claim for comparison. Why the "
        "paper's static rule misses on these CNNs: docs/remap.md.",
        "",
    ]


def sparse_and_wct(lines: list[str]) -> None:
    lines += [
        "## Sparse DNNs on non-ideal crossbars (Bhattacharjee et al., DATE 2022): column rearrangement and WCT",
        "",
        "Claim: pruned networks lose more to crossbar non-idealities than unpruned ones; rearranging columns and "
        "weight-constrained training (WCT) raise the share of low-conductance cells and win back accuracy.",
        "",
        "| model | treatment | float | crossbar accuracy | drop (points) [95% interval] | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    pruned, unpruned = MODELS / "digits_cnn_pruned.onnx", MODELS / "digits_cnn.onnx"
    ok_unpruned, ok_pruned = float_correct(unpruned, "digits"), float_correct(pruned, "digits")
    base_unpruned = correct(unpruned, "digits", **HARDWARE)
    base = correct(pruned, "digits", **HARDWARE)
    rows = [("digits_cnn (unpruned)", "as mapped", ok_unpruned, base_unpruned), ("digits_cnn_pruned", "as mapped", ok_pruned, base)]
    rows.append(("digits_cnn_pruned", "sparse column rearrangement", ok_pruned, correct(pruned, "digits", compile_options={"remap": "sparse"}, **HARDWARE)))
    from xcompile.train import low_conductance_share, train_wct

    x, y = builtin_split("digits", "calib")
    shares = {}
    for label, strength in (("plain fine-tuning (control)", 0.0), ("WCT, strength 1", 1.0)):
        trained = [train_wct(str(pruned), x, y, strength=strength, seed=s) for s in TRAINING_SEEDS]
        ok_f = np.concatenate([float_correct(m, "digits") for m in trained])  # [training seeds x samples] flattened below
        ok_c = np.concatenate([correct(m, "digits", **HARDWARE) for m in trained])
        n = len(builtin_split("digits", "test")[1])
        rows.append(("digits_cnn_pruned", f"{label}, {len(TRAINING_SEEDS)} training seeds", ok_f.reshape(len(TRAINING_SEEDS), n), ok_c))
        shares[label] = np.mean([[v["low_share"] for v in low_conductance_share(m).values()] for m in trained], axis=0)
    for model, label, ok_f, ok_c in rows:
        if ok_f.ndim == 2:  # one float model per training seed: pair each with its crossbar runs
            ok_f = np.repeat(ok_f, len(DEVICE_SEEDS), axis=0)
        paired_f = ok_f if ok_f.ndim == 2 else np.repeat(ok_f[None], ok_c.shape[0], axis=0)
        value, low, high = bootstrap(lambda f, c: float(f.mean() - c.mean()), paired_f, ok_c)
        if label == "as mapped":
            judged = "—"
        else:  # paired with the pruned model as mapped: same device seed, same test digits
            reference_f = np.tile(np.repeat(ok_pruned[None], len(DEVICE_SEEDS), axis=0), (ok_c.shape[0] // len(DEVICE_SEEDS), 1))
            reference_c = np.tile(base, (ok_c.shape[0] // len(DEVICE_SEEDS), 1))
            change = bootstrap(lambda f, c, rf, rc: float((f.mean() - c.mean()) - (rf.mean() - rc.mean())), paired_f, ok_c, reference_f, reference_c)
            interval = f"{100 * change[0]:+.2f} points [{100 * change[1]:+.2f}, {100 * change[2]:+.2f}] against as mapped"
            judged = (f"**reproduced**: loses less, {interval}" if change[2] < 0
                      else f"**not reproduced**: loses more, {interval}" if change[1] > 0
                      else f"**not reproduced**: no difference, {interval}")
        lines.append(f"| {model} | {label} | {ok_f.mean():.2%} | {ok_c.mean():.2%} | {100 * value:.2f} [{100 * low:.2f}, {100 * high:.2f}] | {judged} |")
        print(lines[-1], flush=True)
    original = [v["low_share"] for v in low_conductance_share(onnx.load(str(pruned))).values()]
    lines += [
        "",
        "Share of low-conductance cells (|w| within 10% of the layer's largest) per weight tensor: as shipped "
        + ", ".join(f"{v:.1%}" for v in original) + "; after plain fine-tuning "
        + ", ".join(f"{v:.1%}" for v in shares["plain fine-tuning (control)"]) + "; after WCT "
        + ", ".join(f"{v:.1%}" for v in shares["WCT, strength 1"]) + ". "
        "WCT is fine-tuned on the 256 shipped calibration digits (docs/training.md); the pruned model has 75% of its "
        "channels at zero already, so the share it can move is small.",
        "",
    ]


def acm(lines: list[str]) -> None:
    lines += [
        "## ACM (Kazemi et al., DAC 2020): adjacent connection matrix",
        "",
        "Claim: N outputs on N + 1 non-negative columns instead of 2N, with robustness to device variation.",
        "",
        "| model, variation | encoding | float | crossbar accuracy [95% interval] | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    hardware = {"rows": 128, "cols": 128, "variation": "lognormal", "sigma": 0.1}
    for model in ("digits_cnn", "mnist_cnn"):
        path, dataset = MODELS / f"{model}.onnx", DATASET[model]
        ok_float = float_correct(path, dataset)
        results = {enc: correct(path, dataset, compile_options={"encoding": enc}, **hardware) for enc in ("dual", "acm")}
        for enc, ok in results.items():
            value, low, high = bootstrap(lambda c: float(c.mean()), ok)
            judged = "—"
            if enc == "acm":
                difference = bootstrap(lambda a, d: float(a.mean() - d.mean()), ok, results["dual"])
                judged = ("**reproduced**: at least as robust as dual" if difference[2] >= 0 else
                          f"**not reproduced**: {-100 * difference[0]:.1f} points below dual [{-100 * difference[2]:.1f}, {-100 * difference[1]:.1f}]")
            lines.append(f"| {model}, sigma 0.1, no wire resistance | {enc} | {ok_float.mean():.2%} | {value:.2%} [{low:.2%}, {high:.2%}] | {judged} |")
            print(lines[-1], flush=True)
    lines += ["", "The column count is exact by construction (tests/test_encodings.py). ACM's outputs are differences of two "
              "large column currents (suffix sums), so a relative programming error on each leaves a large absolute error "
              "on their small difference (docs/encodings.md); ACM-aware scaling or compensation is not tried here.", ""]


def sorted_sections(lines: list[str]) -> None:
    lines += [
        "## Sorted sections and bit stucking (Kung & Farias 2024, arXiv 2410.21730)",
        "",
        "Claim: 3.7x fewer crossbar reprogrammings for ResNet-50 and 21x for ViT-Base (trained ImageNet weights), "
        "accuracy within 1%.",
        "",
        "8-bit weights on 2-bit cells (4 slices), dual encoding, 32 x 32 crossbars, fewer physical crossbars than tiles; "
        "otherwise ideal hardware, so the accuracy lost is stucking's alone. Stucking seeds "
        f"{', '.join(map(str, STUCKING_SEEDS))} (the method's own randomness); intervals over them and the test samples.",
        "",
        "| model | tiles on P | writes, layer | sorted | sorted + k=2, p=0.25 | sorted + k=2, p=0 | accuracy: float; k=2, p=0.25 [95%]; k=2, p=0 | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = {"weight_bits": 8, "cell_bits": 2, "rows": 32, "cols": 32}
    breakdown = []
    for model, crossbars in (("digits_cnn", 8), ("mnist_cnn", 8)):
        path, dataset = MODELS / f"{model}.onnx", DATASET[model]
        ok_float = float_correct(path, dataset)
        writes = {}
        for label, options in (("layer", {"schedule": "layer"}), ("sorted", {"schedule": "sorted"})):
            mapping = xcompile.compile_model(path, progress=False, crossbars=crossbars, **options, **base)
            writes[label] = int(mapping.program.schedule.writes.sum())
            if label == "layer":
                tiles = sum(layer.tiling.count for layer in mapping.layers)
                breakdown.append((model, *writes_by_slice_and_magnitude(mapping.program, crossbars)))
        stuck = {}
        for p in (0.25, 0.0):
            oks, counts = [], []
            for seed in STUCKING_SEEDS:
                options = dict(crossbars=crossbars, schedule="sorted", stuck_slices=2, stuck_fraction=p, seed=seed, **base)
                mapping = xcompile.compile_model(path, progress=False, **options)
                counts.append(int(mapping.program.schedule.writes.sum()))
                oks.append(correct(mapping, dataset, seeds=(0,))[0])
            stuck[p] = (np.mean(counts), np.array(oks))
        value, low, high = bootstrap(lambda c: float(c.mean()), stuck[0.25][1])
        factor = writes["layer"] / stuck[0.25][0]
        within = ok_float.mean() - value <= 0.01
        judged = (f"**partly**: {factor:.1f}x within 1 point at p=0.25, short of 3.7x" if within and factor < 3.7
                  else f"**reproduced**: {factor:.1f}x within 1 point" if within else f"**not reproduced**: beyond 1 point at {factor:.1f}x")
        lines.append(
            f"| {model} | {tiles} on {crossbars} | {writes['layer']:,} | {writes['layer'] / writes['sorted']:.2f}x fewer | "
            f"{factor:.2f}x | {writes['layer'] / stuck[0.0][0]:.2f}x | {ok_float.mean():.2%}; {value:.2%} [{low:.2%}, {high:.2%}]; "
            f"{stuck[0.0][1].mean():.2%} | {judged} |"
        )
        print(lines[-1], flush=True)
    lines += ["", "Where the writes of a `layer` pass sit (steady state, no stucking): by slice, and by the magnitude |q| "
              "(0…255) of the weight half being written (dual keeps a weight in a positive and a negative half; the idle "
              "half counts as 0).", "",
              "| model | slice 3 (top) | slice 2 | slice 1 | slice 0 (lowest) | " + " | ".join(f"\\|q\\| {n}" for n in breakdown[0][3]) + " |",
              "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in breakdown[0][3]) + " |"]
    for model, by_slice, by_magnitude, _ in breakdown:
        total = by_slice.sum()
        lines.append(f"| {model} | " + " | ".join(f"{v / total:.0%}" for v in by_slice[::-1]) + " | "
                     + " | ".join(f"{v / total:.0%}" for v in by_magnitude) + " |")
    lines += [
        "",
        "Why the factors stay small. Sorting helps only where consecutive loads of a crossbar hold equal levels in "
        "the same cells. A crossbar drives a row with one input and sums a column into one output, so the finest "
        "sectioning an exact digital bookkeeping can undo is a permutation of a layer's rows and of its columns, not "
        "of single weights: whole sorted rows still hold weights of every size, and most writes are in the two low "
        "slices of small and mid-sized weights, whose bits look random from tile to tile. Stucking those slices is "
        "where the savings are, and a weight with |q| < 16 lives entirely in them: stale low slices are then the whole "
        "weight, yet k = 2 costs these models under a point while k = 3 (6 of 8 bits) breaks them "
        "(docs/studies/schedules.md). The paper's "
        "21x is on ViT-Base; on the trained all-MiniLM-L6-v2 encoder stucking one slice at p = 0.25 already "
        "drops the embeddings' cosine to about 0.56 (docs/schedules.md, `python benchmarks/bench_minilm.py`, dev-only).",
        "",
    ]


def main() -> None:
    warnings.simplefilter("ignore")  # compile-time notes (e.g. ACM scaling) are not the study's subject
    started = time.perf_counter()
    lines = ["# The seed papers against our figures", ""]
    body: list[str] = []
    for section in (x_changr, sparse_and_wct, acm, sorted_sections):
        section(body)
    seconds = time.perf_counter() - started
    lines += [
        f"Made by `python docs/studies/seeds.py` ({seconds / 60:.0f} min on the 2-core machine). Each table gives our "
        "figure on the closest model we have offline, a 95% interval from a two-level bootstrap over the seeds "
        f"(device draws {', '.join(map(str, DEVICE_SEEDS))}; the method's own seeds where it is random) and the test "
        "samples, and a verdict. Hardware: 128 x 128 crossbars, 8-bit weights and cells, dual array, r_wire 2 ohm per "
        "segment, lognormal programming variation sigma 0.05, unless a table says otherwise. Test sets: 450 digits "
        "(8x8) and 1,000 real MNIST digits (28x28).",
        "",
    ] + body
    (HERE / "seeds.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
