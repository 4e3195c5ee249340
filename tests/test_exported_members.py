import types

import enrich


def test_all_is_sorted_and_complete() -> None:
    assert enrich.__all__ == sorted(enrich.__all__, key=lambda n: (not n.isupper(), n))
    for name in enrich.__all__:
        assert hasattr(enrich, name), name
    # (a public submodule, such as `enrich.ray` once imported, is an attribute of the package: not a member)
    public = {
        n
        for n, v in vars(enrich).items()
        if not n.startswith("_") and not (isinstance(v, types.ModuleType) and v.__name__ == f"enrich.{n}")
    }
    assert public - set(enrich.__all__) <= {"annotations"}
