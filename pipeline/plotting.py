"""Plots with Persian and Chinese text: font fallback, right-to-left shaping, atomic PNG writes.

Matplotlib draws glyphs left to right and one code point at a time, so Persian needs two steps before it reaches
a text artist: ``arabic_reshaper`` picks each letter's joined (contextual) form, and the bidi algorithm
(``bidi.get_display``) reverses the right-to-left runs into visual order. ``label`` does both. Glyph coverage comes
from matplotlib's per-glyph font fallback (3.6+): ``setup_fonts`` puts a Latin font first, then one font with
Arabic script and one with Han characters.

Matplotlib is imported inside the functions: stage modules import this one, and they must stay light.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

# Preferred families per script, best first. The CJK collection (.ttc) is listed by matplotlib under the name of its
# first face, which differs between distributions (JP on Debian, SC elsewhere); every face carries all Han glyphs,
# but in its own locale's shapes (令, 骨, 直 are drawn otherwise in JP): ``_simplified_chinese`` finds the SC face.
ARABIC_FONTS = ("Noto Sans Arabic", "Noto Naskh Arabic", "Vazirmatn", "DejaVu Sans")
HAN_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Serif CJK SC", "Noto Serif CJK JP",
             "WenQuanYi Zen Hei", "Droid Sans Fallback")
LATIN_FONTS = ("DejaVu Sans",)

# Arabic, Arabic Supplement, Arabic Extended-A and the presentation forms: what reshaping and bidi apply to.
_ARABIC = re.compile("[\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff\ufe70-\ufeff]")

_fonts: list[str] | None = None
_warned: set[str] = set()


def label(text: str) -> str:
    """``text`` ready for a matplotlib text artist: Arabic-script runs shaped and put in visual order.

    Text without Arabic script is returned unchanged (Chinese and English need nothing).
    """
    if not _ARABIC.search(text):
        return text
    import arabic_reshaper
    from bidi.algorithm import get_display

    return get_display(arabic_reshaper.reshape(text))


def _available() -> set[str]:
    from matplotlib import font_manager

    return {f.name for f in font_manager.fontManager.ttflist}


def _pick(candidates: tuple[str, ...], installed: set[str], script: str) -> str | None:
    for name in candidates:
        if name in installed:
            return name
    if script not in _warned:
        _warned.add(script)
        warnings.warn(
            f"no installed font covers {script} (looked for {', '.join(candidates)}); its labels will show as boxes. "
            "Install fonts-noto-core and fonts-noto-cjk.",
            stacklevel=3,
        )
    return None


def _simplified_chinese(installed: set[str]) -> str | None:
    """Where the CJK collection is listed under another face's name, its Simplified Chinese face, written once as a
    font of its own (fontTools, which matplotlib depends on; 0.3 s and 16 MB in the user's cache folder) and added
    to matplotlib: it reads only a collection's first face. None where there is none or it cannot be written."""
    from matplotlib import font_manager

    want = "Noto Sans CJK SC"
    if want in installed or not any(name.startswith("Noto Sans CJK") for name in installed):
        return want if want in installed else None
    # The regular weight's collection (Debian installs a bold one beside it; labels are drawn regular).
    sources = sorted((f.weight not in (400, "normal", "regular"), f.fname) for f in font_manager.fontManager.ttflist
                     if f.name.startswith("Noto Sans CJK") and f.fname.lower().endswith(".ttc"))
    if not sources:
        return None
    src = Path(sources[0][1])
    try:
        # Path.home() raises where HOME is unset and the user has no passwd entry (docker --user 12345).
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sokhan" / "fonts"
        stat = src.stat()
        dst = cache / f"{src.stem}-SC-{stat.st_size}-{int(stat.st_mtime)}.otf"
        if not dst.exists():
            from fontTools.ttLib import TTCollection

            faces = TTCollection(str(src), lazy=True).fonts
            face = next((f for f in faces if f["name"].getDebugName(1) == want), None)
            if face is None:
                return None
            cache.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
            try:
                face.save(str(tmp))
                os.replace(tmp, dst)
            finally:
                tmp.unlink(missing_ok=True)
        font_manager.fontManager.addfont(str(dst))
    except Exception as e:  # noqa: BLE001 (no or a read-only home, a damaged file: the first face will do)
        if "Han shapes" not in _warned:
            _warned.add("Han shapes")
            warnings.warn(f"could not extract the Simplified Chinese face of {src} ({e}); Chinese labels are drawn "
                          "in the collection's first face's shapes", stacklevel=3)
        return None
    return want


def setup_fonts() -> list[str]:
    """Select the Agg backend and a fallback font list covering Latin, Arabic script and Han; returns the list.

    A script without an installed font gives one warning (per process), never an error: the plot is still drawn.
    """
    global _fonts
    import matplotlib

    matplotlib.use("Agg")
    if _fonts is None:
        installed = _available()
        picked = [_pick(LATIN_FONTS, installed, "Latin"), _pick(ARABIC_FONTS, installed, "Arabic script"),
                  _simplified_chinese(installed) or _pick(HAN_FONTS, installed, "Han (Chinese)")]
        _fonts = list(dict.fromkeys(p for p in picked if p)) or ["sans-serif"]
    matplotlib.rcParams["font.family"] = _fonts
    # Missing-glyph warnings would repeat once per label; the missing-font warning above already said it.
    warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
    return list(_fonts)


# Where a point's label may go, in offset points from the point, nearest first: right and above (the default), right
# and below, left and above, left and below, then one line further out each way.
_LABEL_SPOTS = ((3, 3, "left"), (3, -12, "left"), (-3, 3, "right"), (-3, -12, "right"),
                (3, 14, "left"), (3, -23, "left"), (-3, 14, "right"), (-3, -23, "right"))


def place_labels(fig, labels: list) -> None:
    """Put each point label (an ``Annotation`` in offset points) at the first of a few spots around its point that
    no label placed before it covers, or where it was when none is free. Labels stay beside their points; the most
    frequent tokens of an embedding sit close together, and their labels were printed over each other."""
    from matplotlib.text import Text

    fig.draw_without_rendering()  # the axes fit their data when drawn: measured before, every label was on 0-1 axes
    renderer = fig.canvas.get_renderer()
    placed: list = []
    for a in labels:
        for dx, dy, ha in _LABEL_SPOTS:
            a.xyann = (dx, dy)
            a.set_horizontalalignment(ha)
            box = Text.get_window_extent(a, renderer)
            if not any(box.overlaps(other) for other in placed):
                break
        else:  # crowded all round: the default spot
            a.xyann = _LABEL_SPOTS[0][:2]
            a.set_horizontalalignment(_LABEL_SPOTS[0][2])
            box = Text.get_window_extent(a, renderer)
        placed.append(box)


def save(fig, path: Path | str, dpi: int = 150) -> Path:
    """Write ``fig`` as PNG to ``path`` through a temporary sibling and a rename; closes the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
