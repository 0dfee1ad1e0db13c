"""The generator's persona sets and layouts: the clean REES46 output is unchanged (fingerprint), the
overlapping set is built as described, and the invoice layout reads back through conf/generated_invoices.yaml."""

import hashlib
import pathlib

import numpy as np
import pandas as pd
import pytest
from deltalake import DeltaTable

from segspark import usecases
from segspark.cli import main
from segspark.datagen import (
    DEEP_CATEGORIES,
    INVOICE_COLUMNS,
    PERSONA_SETS,
    GenerateSpec,
    block_truth,
    generate_block,
    write_dataset,
)

from .conftest import data_lines


@pytest.mark.parametrize(("users", "seed", "expected"), [(2500, 42, "89ef82e81641e497"), (1000, 7, "5689e32f144ca465")])
def test_clean_rees46_output_is_unchanged(users, seed, expected):
    spec = GenerateSpec(users=users, seed=seed)
    digest = hashlib.sha256()
    for block in range(spec.blocks):
        digest.update(generate_block(spec, block).to_csv().encode())
        digest.update(block_truth(spec, block).to_csv().encode())
    assert digest.hexdigest()[:16] == expected


def test_overlapping_set_structure():
    persona_set = PERSONA_SETS["overlapping"]
    assert persona_set.categories == DEEP_CATEGORIES
    assert all(len(code.split(".")) == 3 for code in DEEP_CATEGORIES)
    named = {p.name: set(p.categories) for p in persona_set.personas}
    assert all(codes <= set(DEEP_CATEGORIES) for codes in named.values())
    tops = {name: {code.split(".")[0] for code in codes} for name, codes in named.items()}
    # every persona shares a top-level category with another one: they differ below the top level
    for name, mine in tops.items():
        assert any(mine & other for o, other in tops.items() if o != name), name
    assert 0.99 < sum(p.share for p in persona_set.personas) < 1.01

    spec = GenerateSpec(users=2000, seed=1, personas="overlapping")
    events = pd.concat([generate_block(spec, b) for b in range(spec.blocks)], ignore_index=True)
    truth = pd.concat([block_truth(spec, b) for b in range(spec.blocks)], ignore_index=True)
    assert sorted(truth.user_id) == list(range(1, 2001))
    assert set(truth.persona) == set(persona_set.names)  # every persona present
    assert set(events.user_id) == set(truth.user_id)
    assert set(events.category_code) <= set(DEEP_CATEGORIES)
    assert events.category_code.str.split(".").str.len().eq(3).all()
    assert events.category_code.str.split(".").str[0].nunique() == len({c.split(".")[0] for c in DEEP_CATEGORIES})


def test_emerging_set_and_first_user_id():
    """The emerging set is one persona the clean set lacks, in the clean categories; first_user_id
    moves the ids and nothing else (the draws are the same)."""
    assert PERSONA_SETS["emerging"].categories == PERSONA_SETS["clean"].categories
    assert not set(PERSONA_SETS["emerging"].names) & set(PERSONA_SETS["clean"].names)
    spec = GenerateSpec(users=1500, seed=3, personas="emerging", first_user_id=10_001)
    truth = pd.concat([block_truth(spec, b) for b in range(spec.blocks)], ignore_index=True)
    assert sorted(truth.user_id) == list(range(10_001, 11_501)) and set(truth.persona) == {"midnight_splurger"}
    moved = generate_block(spec, 1)
    same = generate_block(GenerateSpec(users=1500, seed=3, personas="emerging"), 1)
    assert (moved.user_id - 10_000).tolist() == same.user_id.tolist()
    columns = ["event_time", "event_type", "product_id", "category_code", "brand", "price"]
    assert moved[columns].equals(same[columns])
    with pytest.raises(ValueError, match="first_user_id must be at least 1"):
        GenerateSpec(users=10, first_user_id=0)


def test_layout_is_checked():
    with pytest.raises(ValueError, match="layout must be one of rees46, invoices"):
        GenerateSpec(users=10, layout="orders")


@pytest.fixture(scope="module")
def invoices(spark, tmp_path_factory):
    """300 users as invoice lines (csv) with planted duplicates and malformed lines, the same lines
    from pandas, and the truth."""
    out = tmp_path_factory.mktemp("invoices")
    spec = GenerateSpec(users=300, days=60, seed=13, personas="overlapping", layout="invoices",
                        duplicate_share=0.01, malformed_share=0.01)
    summary = write_dataset(spark, spec, str(out), "csv")
    lines = pd.concat([generate_block(spec, b) for b in range(spec.blocks)], ignore_index=True)
    truth = spark.read.parquet(str(out / "truth")).toPandas()
    return spec, out, summary, lines, truth


def test_invoice_lines_are_online_retail_lines(invoices):
    spec, out, summary, lines, truth = invoices
    assert summary["layout"] == "invoices" and sum(summary["personas"].values()) == len(truth)
    header = next(p for p in sorted((out / "events").iterdir()) if p.name.startswith("part-")).read_text().split("\n")[0]
    assert header.split(",") == INVOICE_COLUMNS
    lines = lines.drop_duplicates()
    credit = lines.InvoiceNo.str.startswith("C")
    assert 0 < credit.sum() < 0.2 * len(lines)
    assert (lines.Quantity[credit] < 0).all() and (lines.Quantity[~credit] > 0).all()
    assert lines.InvoiceNo.str.fullmatch(r"C?\d{6}").all()
    assert lines.groupby("InvoiceNo").CustomerID.nunique().eq(1).all()  # one customer per invoice
    assert not set(lines.InvoiceNo[credit].str[1:]) & set(lines.InvoiceNo[~credit])  # own numbers
    # Every cancellation takes back (part of) an earlier line of the customer: same product and price.
    sales = lines[~credit].groupby(["CustomerID", "StockCode", "UnitPrice"]).agg(
        bought=("Quantity", "sum"), since=("InvoiceDate", "min"))
    taken = lines[credit].groupby(["CustomerID", "StockCode", "UnitPrice"]).agg(
        back=("Quantity", "sum"), since=("InvoiceDate", "min"))
    joined = taken.join(sales, lsuffix="_credit", how="left")
    assert joined.bought.notna().all() and (-joined.back <= joined.bought).all()
    assert (joined.since_credit > joined.since).all()
    # A product has one description, made from its category.
    assert lines.groupby("StockCode").Description.nunique().eq(1).all()
    assert lines.Description.str.fullmatch(r"[A-Z]+ [A-Z]+ [A-Z]+ \d{6}").all()
    assert lines.Country.value_counts().idxmax() == "United Kingdom" and lines.Country.nunique() > 3
    # The truth lists exactly the customers, each with their persona.
    assert set(truth.user_id) == set(lines.CustomerID.astype(np.int64))
    assert set(truth.persona) == set(PERSONA_SETS["overlapping"].names)
    everyone = block_truth(GenerateSpec(users=300, seed=13, days=60, personas="overlapping"), 0)  # rees46: all
    assert truth.merge(everyone, on="user_id", suffixes=("", "_all")).eval("persona == persona_all").all()
    assert len(truth) < 300  # some users never buy


def test_invoices_read_back_through_ingest(invoices, spark, make_config, tmp_path):
    spec, out, summary, lines, truth = invoices
    cfg = make_config(f"input.path={out}/events", config="conf/generated_invoices.yaml")
    assert cfg.input.format == "csv" and cfg.input.columns.order_id == "InvoiceNo"
    result = usecases.features(spark, cfg, run_id="invoices")

    headers = len([p for p in (out / "events").iterdir() if p.name.startswith("part-")])
    records = data_lines(out / "events") - headers
    duplicates = len(lines) - len(lines.drop_duplicates())
    assert duplicates > 0 and records > len(lines)
    assert result.input_rows == records == result.clean_rows + result.quarantined_rows
    # Only what was planted is quarantined: the duplicate copies and the malformed lines.
    assert result.reasons == {"duplicate": duplicates, "malformed_record": records - len(lines)}
    assert result.clean_rows == len(lines) - duplicates

    features = DeltaTable(str(pathlib.Path(cfg.output.root) / "user_features")).to_pandas()
    assert set(features.user_id) == set(truth.user_id.astype(str))  # "17.0" became "17"
    lines = lines.drop_duplicates()
    credit = lines.InvoiceNo.str.startswith("C")
    assert features.returns.sum() == credit.sum() > 0  # cancellations are returns
    assert features.purchases.sum() == (~credit).sum()
    assert features.frequency.sum() == lines.InvoiceNo[~credit].nunique()
    net = (lines.Quantity * lines.UnitPrice).sum()
    assert features.monetary.sum() == pytest.approx(net, abs=0.01 * len(features))
    assert (features.country_top_1 == 1).mean() > 0.5  # United Kingdom


def test_cli_generate_invoices_defaults_to_csv(spark, capsys, tmp_path):
    code = main(["generate", "--out", str(tmp_path), "--users", "40", "--days", "20", "--layout", "invoices"])
    out = capsys.readouterr().out
    assert code == 0 and "(csv)" in out and "layout: invoices" in out
    part = next(p for p in (tmp_path / "events").iterdir() if p.name.startswith("part-") and p.stat().st_size)
    assert part.read_text().startswith(",".join(INVOICE_COLUMNS) + "\n")
