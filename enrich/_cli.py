"""The `enrich` command line (being written)."""


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("enrich: the command line is not written yet")
