"""Plot labels: Persian shaped right to left, Chinese glyphs present, a missing font a warning, atomic saves."""

from __future__ import annotations

import unicodedata
import warnings

import pytest

from sokhan.pipeline import plotting


@pytest.fixture
def fresh_fonts(monkeypatch):
    """Forget the cached font choice and the per-script warnings, so each test picks again."""
    monkeypatch.setattr(plotting, "_fonts", None)
    monkeypatch.setattr(plotting, "_warned", set())


def test_label_leaves_non_arabic_text_alone():
    for text in ("hello", "中文", "a1 b2", ""):
        assert plotting.label(text) == text


def test_label_shapes_persian_and_reverses_it():
    out = plotting.label("سلام")
    # Reshaping turns the letters into presentation forms (joined shapes; lam + alef become one ligature) ...
    assert all(0xFB50 <= ord(c) <= 0xFEFF for c in out), [unicodedata.name(c) for c in out]
    # ... and bidi puts them in visual order: the word's first letter (seen, initial form) ends up on the right.
    assert unicodedata.name(out[-1]) == "ARABIC LETTER SEEN INITIAL FORM"
    assert "MEEM" in unicodedata.name(out[0])


def test_label_keeps_latin_in_mixed_text_in_reading_order():
    out = plotting.label("کتاب GPU")
    assert "GPU" in out


def test_setup_fonts_covers_arabic_and_han(fresh_fonts):
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    families = plotting.setup_fonts()

    def covered(ch: str) -> bool:
        for fam in families:
            path = font_manager.findfont(font_manager.FontProperties(family=fam), fallback_to_default=False)
            if FT2Font(path).get_char_index(ord(ch)):
                return True
        return False

    installed = plotting._available()
    if not any(f in installed for f in plotting.HAN_FONTS) or not any(f in installed for f in plotting.ARABIC_FONTS[:2]):
        pytest.skip("Noto Arabic / CJK fonts are not installed here (apt: fonts-noto-core fonts-noto-cjk)")
    # Shaped Persian uses the presentation forms, so those must be in a font too, not only the base letters.
    for ch in ("中", "語", "س", plotting.label("سلام")[0], "A"):
        assert covered(ch), f"no font in {families} has {ch!r}"


def _cjk_collection(monkeypatch, tmp_path):
    """A font list as Debian's: the collection under its first face's name and no SC face yet (an earlier test may
    have added the extracted one to matplotlib), extracted into ``tmp_path``."""
    from matplotlib import font_manager

    found = [f for f in font_manager.fontManager.ttflist
             if f.name.startswith("Noto Sans CJK") and f.fname.lower().endswith(".ttc")]
    if not found:
        pytest.skip("no Noto Sans CJK collection (.ttc) installed here (apt: fonts-noto-cjk)")
    installed = {f.name for f in font_manager.fontManager.ttflist} - {"Noto Sans CJK SC"} | {found[0].name}
    monkeypatch.setattr(plotting, "_available", lambda: installed)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))


def test_chinese_is_drawn_with_the_simplified_chinese_face(fresh_fonts, monkeypatch, tmp_path):
    """Debian's collection is listed under its first face, Japanese: 令, 骨, 直 came out in Japanese shapes."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    _cjk_collection(monkeypatch, tmp_path)
    assert "Noto Sans CJK SC" in plotting.setup_fonts()
    path = font_manager.findfont(font_manager.FontProperties(family="Noto Sans CJK SC"), fallback_to_default=False)
    face = FT2Font(path)
    assert (face.family_name, face.style_name) == ("Noto Sans CJK SC", "Regular") and face.get_char_index(ord("令"))
    written = sorted((tmp_path / "sokhan" / "fonts").iterdir())
    assert [p.suffix for p in written] == [".otf"]  # one face, no temporaries
    monkeypatch.setattr(plotting, "_fonts", None)
    before = written[0].stat().st_mtime_ns
    plotting.setup_fonts()  # again: from the cache, not written again
    assert sorted((tmp_path / "sokhan" / "fonts").iterdir()) == written and written[0].stat().st_mtime_ns == before


def test_a_face_that_cannot_be_extracted_is_a_warning(fresh_fonts, monkeypatch, tmp_path):
    import fontTools.ttLib

    _cjk_collection(monkeypatch, tmp_path)

    def broken(*args, **kwargs):
        raise OSError("damaged collection")

    monkeypatch.setattr(fontTools.ttLib, "TTCollection", broken)
    with pytest.warns(UserWarning, match="could not extract the Simplified Chinese face"):
        families = plotting.setup_fonts()
    assert "Noto Sans CJK SC" not in families and any(f in families for f in plotting.HAN_FONTS)


def test_no_home_folder_is_a_warning(fresh_fonts, monkeypatch, tmp_path):
    """HOME unset and no passwd entry (docker --user 12345): Path.home() raised through setup_fonts."""
    from pathlib import Path

    _cjk_collection(monkeypatch, tmp_path)
    monkeypatch.delenv("XDG_CACHE_HOME")

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with pytest.warns(UserWarning, match="could not extract the Simplified Chinese face"):
        families = plotting.setup_fonts()
    assert any(f in families for f in plotting.HAN_FONTS)


@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")  # expected here: no fonts were found
def test_missing_fonts_warn_once_and_do_not_fail(fresh_fonts, monkeypatch, tmp_path):
    monkeypatch.setattr(plotting, "_available", lambda: set())
    with pytest.warns(UserWarning, match="no installed font covers"):
        families = plotting.setup_fonts()
    assert families == ["sans-serif"]
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_title(plotting.label("سلام 中文"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plotting.setup_fonts()  # cached: no second warning
    assert plotting.save(fig, tmp_path / "p.png").stat().st_size > 0


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, fresh_fonts):
    import matplotlib.pyplot as plt

    plotting.setup_fonts()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    ax.set_title(plotting.label("فارسی") + " 中文 English")
    out = plotting.save(fig, tmp_path / "sub" / "plot.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["plot.png"]
    assert not plt.get_fignums()  # closed


def test_point_labels_are_placed_where_no_other_label_is(fresh_fonts):
    """The embedding plot printed the labels of close points over each other."""
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    plotting.setup_fonts()

    def figure(points):
        fig, ax = plt.subplots()
        ax.scatter(*zip(*points))
        return fig, [ax.annotate(f"w{i}", xy, xytext=(3, 3), textcoords="offset points", fontsize=11)
                     for i, xy in enumerate(points)]

    def boxes(fig, labels):
        fig.draw_without_rendering()
        return [Text.get_window_extent(a, fig.canvas.get_renderer()) for a in labels]

    # Four labels of one point: annotate puts them on each other; placed, none covers another.
    crowd = [(50, 50)] * 4 + [(90, 10)]
    fig, labels = figure(crowd)
    assert boxes(fig, labels)[0].overlaps(boxes(fig, labels)[1])
    plt.close(fig)
    fig, labels = figure(crowd)
    plotting.place_labels(fig, labels)
    placed = boxes(fig, labels)
    assert not any(placed[i].overlaps(placed[j]) for i in range(5) for j in range(i))
    assert labels[0].xyann == (3, 3) and labels[4].xyann == (3, 3)  # the first and a lone one keep the usual spot
    plt.close(fig)
    # Points spread over the axes once matplotlib fits them to the data, which it does only when drawing: measured
    # before, all of them sat near 0 on the default 0-1 axes, collided, and were moved for nothing.
    fig, labels = figure([(0.001 * i, 0.001 * i) for i in range(1, 6)])
    plotting.place_labels(fig, labels)
    assert [a.xyann for a in labels] == [(3, 3)] * 5
    plt.close(fig)
