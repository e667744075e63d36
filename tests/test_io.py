"""Pattern I/O: every real file in the shared data loads with the right numbers; every bad file fails cleanly.

References: the shared data's normalised columns (read with numpy.loadtxt) and its manifest for the
real files; the hand-written files in tests/data/good, whose values are known; tests/data/bad for
inputs that must give exit 2 and one error line naming the file.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xtalsolve.cli import main
from xtalsolve.errors import XtalsolveError
from xtalsolve.io import MAX_POINTS, read_pattern, write_xy

HERE = Path(__file__).resolve().parent
GOOD = HERE / "data" / "good"
BAD = HERE / "data" / "bad"
EXPERIMENTAL = HERE.parents[0].parent / "shared" / "data" / "experimental"
MANIFEST = EXPERIMENTAL / "manifest.csv"
UNIT_OF = {"2theta_deg": "2theta", "q_invA": "q", "r_A": "r"}


def _manifest() -> list[dict]:
    return list(csv.DictReader(MANIFEST.open())) if MANIFEST.is_file() else []


def _no_data(n_args: int = 1):
    return [pytest.param(*(None,) * n_args, marks=pytest.mark.skip(reason=f"shared data not found at {EXPERIMENTAL}"))]


def _stated_wavelengths(row: dict) -> list[float] | None:
    """The manifest's wavelength(s) in angstrom, or None where it is unknown / not applicable."""
    try:
        return [float(v) for v in row["wavelength_A"].split(";")]
    except ValueError:
        return None


def run_cli(args, capsys, monkeypatch) -> tuple[int, str, str]:
    """Run the real console entry point in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["xtalsolve", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


# ---------------------------------------------------------------- the shared real data


@pytest.mark.parametrize("row", [pytest.param(r, id=r["case_id"]) for r in _manifest()] or _no_data())
def test_manifest_pattern_file(row):
    path = EXPERIMENTAL / row["pattern_file"]
    pattern = read_pattern(path)
    table = np.loadtxt(path, ndmin=2)
    assert len(pattern) == len(table)
    np.testing.assert_array_equal(pattern.x, table[:, 0])
    np.testing.assert_array_equal(pattern.y, table[:, 1])
    assert pattern.unit == UNIT_OF[row["x_unit"]]
    if table.shape[1] > 2:  # x y sigma, or r G dG, or r G dr dG: sigma is the last column
        np.testing.assert_array_equal(pattern.sigma, table[:, -1])
        assert not pattern.meta["sigma_estimated"]
    else:
        assert pattern.meta["sigma_estimated"]
    stated = _stated_wavelengths(row)
    if row["kind"] == "pxrd" and stated:
        assert pattern.wavelength == pytest.approx(stated[0], rel=1e-9)
        if len(stated) == 2:
            assert pattern.meta["wavelengths_A"] == pytest.approx(stated)
        # Bragg: Q = 2 pi / d with d = lambda / (2 sin theta)
        d = stated[0] / (2 * np.sin(np.radians(pattern.x[-1] / 2)))
        assert pattern.q[-1] == pytest.approx(2 * np.pi / d)
    else:  # unknown for XRED; the normalised PDFs do not repeat the raw header's wavelength
        assert pattern.wavelength is None


def _raw_cases() -> list:
    cases = []
    for row in _manifest():
        for other in filter(None, row["other_files"].split(";")):
            name = other.lower()
            if name.endswith((".rtv.combined.cif", ".xra", ".gr")) or name.endswith("_published_calc.xy"):
                cases.append(pytest.param(row, other, id=f"{row['case_id']}:{Path(other).name}"))
    return cases or _no_data(2)


@pytest.mark.parametrize("row, other", _raw_cases())
def test_original_files(row, other):
    """The deposited / raw originals give the same numbers as the normalised columns made from them."""
    raw = read_pattern(EXPERIMENTAL / other)
    reference = np.loadtxt(EXPERIMENTAL / row["pattern_file"], ndmin=2)
    stated = _stated_wavelengths(row)
    if other.endswith("_published_calc.xy"):  # calculated profile over (nearly) the measured range
        assert raw.unit == "2theta" and len(raw) > 500
        assert reference[0, 0] - 1e-6 <= raw.x[0] and raw.x[-1] <= reference[-1, 0] + 1e-6
        assert raw.wavelength == pytest.approx(stated[0])
        return
    assert len(raw) == len(reference)
    # the normalised columns keep 8 significant digits
    for column, values in enumerate((raw.x, raw.y) + ((raw.sigma,) if reference.shape[1] > 2 else ())):
        expected = reference[:, -1 if column == 2 else column]
        np.testing.assert_allclose(values, expected, rtol=1e-7, atol=1e-12 * np.abs(expected).max())
    if other.endswith(".cif"):
        assert raw.meta["y_tag"] == row["y_quantity"]
        assert raw.wavelength == pytest.approx(stated[0], rel=2e-6)  # the CIF may carry one more digit
    elif other.upper().endswith(".XRA"):
        # GSAS raw data never hold the wavelength, and INST_XRY.PRM is not named in the file
        assert raw.wavelength is None and raw.meta["format"] == "gsas-std"
        assert read_pattern(EXPERIMENTAL / other, wavelength=stated[0]).q[0] > 0
    else:  # raw PDF: the header states the X-ray wavelength; neutron TOF headers state none
        assert raw.unit == "r"
        assert raw.wavelength == (pytest.approx(stated[0]) if stated else None)


# ---------------------------------------------------------------- hand-written files of each format


def test_text_three_columns_with_free_text_wavelength():
    p = read_pattern(GOOD / "synchrotron.xye")
    assert len(p) == 25 and p.unit == "2theta"
    np.testing.assert_allclose(p.x, 2.0 + 0.005 * np.arange(25), atol=1e-9)
    np.testing.assert_allclose(p.sigma, np.round(np.sqrt(p.y), 4), atol=1e-4)
    assert p.wavelength == pytest.approx(0.45892) and not p.meta["sigma_estimated"]


def test_csv_without_wavelength_reads_but_has_no_q():
    p = read_pattern(GOOD / "lab.csv")
    assert len(p) == 20 and p.wavelength is None and p.unit == "2theta"
    assert p.x[0] == 10.0 and p.x[-1] == pytest.approx(10.38)
    np.testing.assert_allclose(p.sigma, np.sqrt(np.maximum(p.y, 1)))
    with pytest.raises(XtalsolveError, match="need a wavelength"):
        p.q
    with pytest.raises(XtalsolveError, match="need a wavelength"):
        read_pattern(GOOD / "lab.csv", require_wavelength=True)
    q = read_pattern(GOOD / "lab.csv", radiation="CuKa1", require_wavelength=True).q
    assert q[0] == pytest.approx(4 * np.pi * np.sin(np.radians(5.0)) / 1.54056)


def test_decimal_commas_and_semicolons():
    p = read_pattern(GOOD / "european.csv")  # "Winkel 2Theta [°];Intensität [cps]", CRLF, "10,02;105,5"
    np.testing.assert_allclose(p.x, [10.0, 10.02, 10.04, 10.06])
    np.testing.assert_allclose(p.y, [100.0, 105.5, 99.0, 101.25])
    assert p.meta["decimal_comma"]


def test_q_data_need_no_wavelength():
    p = read_pattern(GOOD / "q_space.dat", require_wavelength=True)
    assert p.unit == "q" and p.wavelength is None and len(p) == 16
    np.testing.assert_allclose(p.q, np.linspace(0.5, 5.0, 16), atol=1e-4)


def test_descending_file_is_reversed():
    p = read_pattern(GOOD / "descending.xy")
    assert np.all(np.diff(p.x) > 0) and p.meta["reversed"]
    assert (p.x[0], p.y[0], p.x[-1], p.y[-1]) == (pytest.approx(39.45), 210, 40.0, 100)


def test_xrdml_start_end_positions():
    path = GOOD / "si_scan.xrdml"
    p = read_pattern(path)
    counts = re.search(r"<intensities[^>]*>([^<]*)<", path.read_text()).group(1).split()
    np.testing.assert_array_equal(p.y, np.array(counts, dtype=float))
    np.testing.assert_allclose(p.x, np.linspace(20.0084, 20.8084, 41))
    assert p.wavelength == 1.540598 and p.meta["wavelengths_A"] == [1.540598, 1.544426]
    assert p.meta["ka2_ka1_ratio"] == 0.5 and p.meta["schema"].endswith("1.5")
    np.testing.assert_allclose(p.sigma, np.sqrt(p.y))


def test_xrdml_list_positions_counts_per_second():
    p = read_pattern(GOOD / "co_listpositions.xrdml")
    np.testing.assert_allclose(p.x, [30.0, 30.05, 30.1, 30.15, 30.2, 30.3, 30.4, 30.5])
    assert p.y[3] == 95.5 and p.wavelength == 1.78896
    np.testing.assert_allclose(p.sigma, np.sqrt(p.y * 2.0) / 2.0)  # Poisson on counts = cps * 2 s


def test_gsas_std_with_counters_and_instrument_file():
    p = read_pattern(GOOD / "std_counters.gsa")
    assert len(p) == 23 and p.meta["format"] == "gsas-std"
    np.testing.assert_allclose(p.x, 15.0 + 0.02 * np.arange(23))  # 1500 + 2 centidegrees
    assert (p.y[12], p.y[20], p.y[-1]) == (1591, 0, 614)
    assert p.sigma[0] == pytest.approx(np.sqrt(609))  # one counter
    assert p.sigma[14] == pytest.approx(np.sqrt(3598 / 2))  # two counters: sigma = sqrt(c / n)
    assert p.sigma[20] == 1.0  # zero counts
    assert p.wavelength == 1.5405 and p.meta["wavelengths_A"] == [1.5405, 1.5443]  # inst_cu.prm ICONS


def test_gsas_esd_and_fxye():
    esd = read_pattern(GOOD / "esd.gsa")
    np.testing.assert_allclose(esd.x, 5.0 + 0.005 * np.arange(12))
    assert (esd.y[4], esd.sigma[4], esd.wavelength) == (980.3, 15.9, 0.72932)
    fxye = read_pattern(GOOD / "fxye_bank.fxye")
    np.testing.assert_allclose(fxye.x, 8.0 + 0.005 * np.arange(20))  # centidegrees in the file
    assert fxye.y[10] == 350.0 and fxye.sigma[10] == pytest.approx(np.sqrt(350.0), abs=1e-5)
    assert fxye.wavelength == 0.41328  # from fxye_bank.instprm (same base name)


def test_gsas_records_in_a_dat_file(tmp_path):
    copy = tmp_path / "scan.dat"
    copy.write_bytes((GOOD / "esd.gsa").read_bytes())
    assert read_pattern(copy).meta["format"] == "gsas-esd"


def test_powder_cif_two_blocks_with_uncertainties():
    p = read_pattern(GOOD / "two_block_profile.cif")
    np.testing.assert_allclose(p.x, 5.0 + 0.02 * np.arange(12))
    assert (p.y[5], p.sigma[5]) == (2870, 54)
    assert p.wavelength == 0.7093 and p.meta["wavelengths_A"] == [0.7093, 0.71359]
    assert p.meta["cif_block"] == "TEST_profile" and "data_global" in p.meta["wavelength_source"]


def test_pdf_with_pdfgetx3_header():
    p = read_pattern(GOOD / "pdfgetx3_like.gr")
    assert p.unit == "r" and len(p) == 11 and p.wavelength == 0.1665
    assert (p.x[0], p.y[0], p.sigma[0]) == (0.5, -0.1203, 0.0102)


def test_wavelength_override_is_recorded():
    p = read_pattern(GOOD / "synchrotron.xye", wavelength=0.4590)
    assert p.wavelength == 0.4590 and p.meta["wavelength_file_A"] == pytest.approx(0.45892)
    assert p.meta["wavelength_source"] == "--wavelength"


@pytest.mark.parametrize("name", ["si_scan.xrdml", "pdfgetx3_like.gr", "lab.csv", "q_space.dat"])
def test_write_xy_round_trip(name, tmp_path):
    original = read_pattern(GOOD / name)
    out = write_xy(original, tmp_path / "out.xy", header={"sample": "test  sample", "note": "two\nlines"})
    text = out.read_text()
    assert "# sample: test sample\n" in text and "# note: two lines\n" in text
    back = read_pattern(out)
    assert back.unit == original.unit and back.wavelength == original.wavelength
    assert back.meta.get("wavelengths_A") == original.meta.get("wavelengths_A")
    for a, b in ((back.x, original.x), (back.y, original.y), (back.sigma, original.sigma)):
        np.testing.assert_allclose(a, b, rtol=1e-9)


def test_truncated_files_fail_cleanly(tmp_path):
    """Any prefix of a good file either reads or gives an XtalsolveError, never another exception."""
    rng = np.random.default_rng(0)
    for source in sorted(GOOD.iterdir()):
        if source.suffix in (".prm", ".instprm"):
            continue
        data = source.read_bytes()
        for cut in rng.integers(1, len(data), 6):
            target = tmp_path / source.name
            target.write_bytes(data[:cut])
            try:
                read_pattern(target)
            except XtalsolveError as err:
                assert str(target) in str(err)


# ---------------------------------------------------------------- bad input: exit 2, one line naming the file

EXPECTED = {
    "absurd_wavelength.xye": "outside 0.01-20",
    "alt_records.gsa": "ALT records are not supported",
    "bad_step.gsa": "step of -2",
    "binary.xy": "binary file",
    "binary_no_nul.dat": "binary file",
    "duplicate_x.xy": "x repeats at point 3",
    "empty.xy": "file is empty",
    "five_columns.xye": "5 columns",
    "header_only.xy": "no data lines",
    "inf_sigma.xye": "NaN or infinite",
    "missing_counts.cif": "missing",
    "nan_value.xy": "NaN or infinite",
    "negative_r.gr": "outside 0-1000 for r",
    "negative_sigma.xye": "negative sigma",
    "negative_wavelength.xy": "wavelength -1.54056 angstrom, outside",
    "no_bank.gsa": "no BANK record",
    "no_extension": "unknown pattern format",
    "no_intensities.xrdml": "neither <intensities> nor <counts>",
    "not_monotonic.xy": "x goes back at point 3",
    "not_xrdml.xrdml": "not XRDML",
    "omega_scan.xrdml": "no 2Theta positions",
    "one_column.xy": "only one column",
    "positions_mismatch.xrdml": "3 2Theta positions but 4 intensities",
    "q_out_of_range.dat": "outside 0-100 for q",
    "ragged_columns.xy": "line 3 has 3 columns",
    "range_mismatch.cif": "do not fit",
    "single_point.xy": "only 1 data point",
    "structure_only.cif": "no powder profile",
    "text_in_data.xy": "'n/a' is not a number",
    "text_intensities.xrdml": "'lots', not a number",
    "tof_bank.gsa": "time-of-flight",
    "tof_not_2theta.xy": "--x-unit",
    "truncated.gsa": "only 20 are present",
    "truncated.xrdml": "not valid XRDML",
    "unknown_extension.foo": "unknown pattern format '.foo'",
    "whitespace_only.xy": "only whitespace",
    "zero_wavelength.xrdml": "wavelength 0.0 angstrom, outside",
}


def test_bad_corpus_is_complete():
    assert sorted(p.name for p in BAD.iterdir()) == sorted(EXPECTED)


def _assert_one_line_error(code: int, err: str, name: str, fragment: str):
    assert code == 2
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and name in lines[0] and fragment in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_file_gives_one_line_and_exit_2(name, capsys, monkeypatch):
    code, out, err = run_cli(["info", BAD / name], capsys, monkeypatch)
    _assert_one_line_error(code, err, name, EXPECTED[name])
    assert out == ""


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["lab.csv", "--x-unit", "q"], "states x in 2theta, but --x-unit q"),
        (["q_space.dat", "--x-unit", "2theta"], "states x in q"),
        (["two_block_profile.cif", "--radiation", "CuKa"], "states wavelength 0.7093 angstrom but --radiation CuKa"),
        (["lab.csv", "--wavelength", "-1"], "--wavelength"),
        (["lab.csv", "--wavelength", "150"], "outside 0.01-20"),
        (["lab.csv", "--radiation", "XyKa"], "unknown radiation"),
        (["lab.csv", "--radiation", "CuKa", "--wavelength", "1.5"], "not both"),
        (["does_not_exist.xy"], "no such file"),
    ],
)
def test_bad_options_give_one_line_and_exit_2(args, fragment, capsys, monkeypatch):
    code, _, err = run_cli(["info", GOOD / args[0], *args[1:]], capsys, monkeypatch)
    _assert_one_line_error(code, err, args[0], fragment)


def test_ten_million_points_refused_before_parsing(tmp_path, capsys, monkeypatch):
    huge = tmp_path / "huge.xy"
    huge.write_bytes(b"# ten million points\n" + b"10.0 1\n" * 10_000_000)
    with pytest.raises(XtalsolveError, match=rf"too many points \(10000000 > {MAX_POINTS}\)"):
        read_pattern(huge)
    code, _, err = run_cli(["info", huge], capsys, monkeypatch)
    _assert_one_line_error(code, err, "huge.xy", "too many points (10000000 > 1000000)")
    bank = tmp_path / "huge.gsa"
    bank.write_text("title\nBANK 1 10000000 1000000 CONST 1000 1 0 0 STD\n")
    with pytest.raises(XtalsolveError, match="too many points"):
        read_pattern(bank)


def test_info_json_on_a_good_file(capsys, monkeypatch):
    code, out, err = run_cli(["info", GOOD / "si_scan.xrdml", "--json"], capsys, monkeypatch)
    assert code == 0 and err == ""
    summary = json.loads(out)
    assert summary["points"] == 41 and summary["x_unit"] == "2theta" and summary["format"] == "xrdml"
    assert summary["wavelength_A"] == 1.540598 and summary["wavelengths_A"] == [1.540598, 1.544426]
    assert summary["x_min"] == pytest.approx(20.0084) and summary["y_max"] == 3141


def test_info_table_reports_unknown_wavelength(capsys, monkeypatch):
    code, out, _ = run_cli(["info", GOOD / "lab.csv"], capsys, monkeypatch)
    assert code == 0 and re.search(r"wavelength_A\s*│\s*unknown", out)


def test_module_entry_point_end_to_end():
    """``python -m xtalsolve.cli``: real process, real exit codes, no traceback."""
    bad = subprocess.run(
        [sys.executable, "-m", "xtalsolve.cli", "info", str(BAD / "binary.xy")], capture_output=True, text=True
    )
    _assert_one_line_error(bad.returncode, bad.stderr, "binary.xy", "binary file")
