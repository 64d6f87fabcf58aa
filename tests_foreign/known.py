"""Cases expected to fail today, each with the reason and the item of issue 22 whose fix makes it pass.

The matrix marks them ``xfail(strict=True)``: once a fix lands the case passes, the XPASS turns the run red,
and its entry here must go. Everything not listed must pass.
"""

KNOWN: dict[str, str] = {
}
