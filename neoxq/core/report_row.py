"""One row of report.json, a file's scores against the reference, as typed data; and the schema
version report.json records. docs/report-format.md describes every field and each version.

report.json stays plain JSON (the source of truth, read by other tools); inside neoxq the rows are
ReportRow objects from the moment they are scored or read back (`rows_of`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# report.json's "schema". 2: the field appeared, rows unchanged from the files that lack it (1).
# Bump it when a field changes meaning or goes away, and say so in docs/report-format.md.
REPORT_SCHEMA = 2

# The fields a sweep keeps of each revision's rows (sweep.json), in this order.
SWEEP_FIELDS = (
    "type",
    "size_bytes",
    "bpw",
    "ppl",
    "ppl_se",
    "dppl_pct",
    "dppl_pct_se",
    "dppl_pct_se_window",
    "kld_mean",
    "kld_mean_se",
    "kld_mean_se_window",
    "kld_p99",
    "top1",
    "top1_se",
    "vs_stock",
    "tasks",
)


@dataclass
class ReportRow:
    type: str  # the row's label: a quant type, <TYPE>-mix, -opt, -opt-mix, or an added file's name
    file: str | None = None  # the GGUF's name in the report folder (an added file: its path)
    size_bytes: int | None = None
    sha256: str | None = None
    bpw: float | None = None  # bits per weight over all tensors
    ppl: float | None = None
    ppl_se: float | None = None
    dppl_pct: float | None = None  # perplexity change against the reference, %
    dppl_pct_se: float | None = None  # per token (llama-perplexity's)
    dppl_pct_se_window: float | None = None  # from the scored windows' means (the one shown)
    kld_mean: float | None = None
    kld_mean_se: float | None = None
    kld_mean_se_window: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    top1: float | None = None  # share of positions whose most likely token agrees with the reference
    top1_se: float | None = None
    rms_dp: float | None = None
    stats: dict | None = None  # every llama-perplexity --kl-divergence figure, both errors
    tokens: dict | None = None  # the per-token file: {"file": "tokens/<TYPE>.npz", "sha256": …}
    pp_tps: float | None = None
    tg_tps: float | None = None
    speed: dict | None = None  # the runs behind pp/tg, and whether they are reliable
    convert_s: float | None = None  # a float type's time to write
    quantize_s: float | None = None  # a quantized type's time to write
    imatrix: bool | None = None  # quantized with an importance matrix
    mix: dict | None = None  # a -mix file's budget
    optimize: dict | None = None  # an -opt file's method and calibration
    tasks: dict | None = None  # lm-eval metrics per task
    vs_stock: dict | None = None  # a variant against its stock row, paired on the same tokens
    reused: bool | None = None  # the scores were read back, not computed
    file_reused: bool | None = None  # the GGUF was reused, not made
    added: bool | None = None  # a file given with --add (made elsewhere: AutoRound's, another run's)

    @classmethod
    def from_json(cls, data: dict) -> "ReportRow":
        """A row of report.json or sweep.json (fields it lacks are None; unknown keys are ignored,
        so a newer file reads)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def as_json(self) -> dict:
        """The row as report.json holds it: fields that are None are left out."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def sweep_json(self) -> dict:
        """What sweep.json keeps of the row."""
        whole = self.as_json()
        return {k: whole.get(k) for k in SWEEP_FIELDS if k in whole or k != "tasks"}

    @property
    def speed_reliable(self) -> bool:
        return (self.speed or {}).get("reliable", True)


def rows_of(report: dict) -> list[ReportRow]:
    """report.json's (or one sweep revision's) rows, typed."""
    return [ReportRow.from_json(r) for r in report.get("results", [])]


def best_at_each_size(rows: list[ReportRow]) -> list[tuple[ReportRow, ReportRow]]:
    """(stock row, the row of lowest KLD among all files at or under its size) for each quantized
    stock type, smallest first. Size is the tensors' bits per weight: a file's metadata (an -opt
    file's provenance keys) does not count. Stock rows are the types without a variant suffix."""
    scored = [r for r in rows if r.kld_mean is not None and r.bpw is not None]
    stock = [r for r in scored if "-" not in r.type and r.bpw < 16 and not r.added]
    out = []
    for s in sorted(stock, key=lambda r: r.bpw):
        fits = [r for r in scored if r.bpw <= s.bpw]
        out.append((s, min(fits, key=lambda r: r.kld_mean)))
    return out
