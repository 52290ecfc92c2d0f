"""Terminal output for the command line: liverpipe's own text is printed literally.

rich reads ``[...]`` in a string as markup and drops what it takes for a tag, and
liverpipe's messages name their fixes by config section (``[check] min_slices``,
``[preprocess] slice_size``). So messages are assembled as :class:`rich.text.Text`,
with styles only on the labels liverpipe adds, and tables print without markup.
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

__all__ = ["err_console", "say", "table_console"]

err_console = Console(stderr=True, soft_wrap=True)


def say(label: str, style: str, message: str) -> None:
    """``label`` in ``style``, then ``message`` as it is, on stderr."""
    err_console.print(Text.assemble((label, style), " ", message))


def table_console() -> Console:
    """A stdout console that prints table cells and titles literally."""
    return Console(markup=False)
