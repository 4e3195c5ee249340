import enrich


def test_all_is_sorted_and_complete() -> None:
    assert enrich.__all__ == sorted(enrich.__all__, key=lambda n: (not n.isupper(), n))
    for name in enrich.__all__:
        assert hasattr(enrich, name), name
    public = {n for n in vars(enrich) if not n.startswith("_")}
    assert public - set(enrich.__all__) <= {"annotations"}
