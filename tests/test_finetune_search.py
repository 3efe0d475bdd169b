"""benchmarks/finetune_search.py: the defender's validation rows are a seeded split of the clean
pairs, disjoint from the pairs they fine-tune on, and a bad fraction is refused."""

import pytest
from _benchmarks import load_benchmark


def test_the_validation_rows_are_a_seeded_disjoint_part_of_the_clean_pairs(tmp_path):
    from clipguard.data.csv_dataset import CsvSpec, read_rows, write_csv

    mod = load_benchmark("finetune_search")
    clean = tmp_path / "clean.csv"
    rows = [{"filepath": f"/data/{i:03d}.png", "title": f"a photo {i}", "label": str(i % 10)} for i in range(50)]
    write_csv(clean, rows, ["filepath", "title", "label"])
    spec = CsvSpec(allow_outside_root=True)
    splits = []
    for work in (tmp_path / "a", tmp_path / "b", tmp_path / "c"):
        work.mkdir()
        fit, val = mod.split_clean(clean, work, seed=1 if work.name != "c" else 2, fraction=0.2)
        splits.append(([r["filepath"] for r in read_rows(fit, spec)[1]], [r["filepath"] for r in read_rows(val, spec)[1]]))
    (fit_a, val_a), (fit_b, val_b), (_, val_c) = splits
    assert len(val_a) == 10 and len(fit_a) == 40 and not set(fit_a) & set(val_a)
    assert sorted(fit_a + val_a) == [r["filepath"] for r in rows]
    assert (fit_a, val_a) == (fit_b, val_b) and val_a != val_c          # seeded


def test_a_bad_fraction_is_refused(tmp_path):
    mod = load_benchmark("finetune_search")
    with pytest.raises(SystemExit, match="--val-fraction"):
        mod.main([str(tmp_path), "--config", "x.yaml", "--attack", "five", "--seeds", "1", "--work",
                  str(tmp_path / "w"), "--defense", "par", "--lrs", "1e-4", "--val-fraction", "1.5"])
