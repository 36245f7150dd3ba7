"""Screenshots of a graph page for the README: the default view, the feature panel, a pinned subgraph.

Opens the page in headless Chromium (Playwright, the system's Chromium) at 1600×1000 and writes
three PNG files into `--out`. The feature panel shows the most influential feature that has a card;
the pinned subgraph pins the `--pins` most influential features shown at the page's threshold and
the likeliest logit, and shows them alone, labelled.

    clt demo --output-dir /tmp/demo-page
    python experiments/graph_page_screenshots.py /tmp/demo-page/attribution/graph.html --out docs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
_TOP_FEATURES = """(count) => { const N = cltApp.D.nodes, bit = 1 << cltApp.level();
  return N.id.map((id, i) => i).filter(i => N.kind[i] === 'f' && (N.levels[i] & bit))
    .sort((a, b) => N.infl[b] - N.infl[a]).slice(0, count).map(i => N.id[i]); }"""


def screenshots(page_path: Path, out: Path, pins: int = 8) -> dict[str, str]:
    """Write graph_page.png, graph_page_card.png and graph_page_subgraph.png; return what each shows."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    shown: dict[str, str] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(page_path.resolve().as_uri())
        page.wait_for_function("window.cltApp !== undefined")
        page.wait_for_timeout(500)
        page.screenshot(path=str(out / "graph_page.png"))
        shown["graph_page.png"] = "default view"
        carded = page.evaluate(
            """() => { const N = cltApp.D.nodes; let best = -1;
            N.id.forEach((id, i) => {
              if (N.kind[i] === 'f' && N.card[i] && (best < 0 || N.infl[i] > N.infl[best])) best = i; });
            return best < 0 ? null : N.id[best]; }"""
        )
        if carded is not None:
            page.evaluate(f"cltApp.select({json.dumps(carded)})")
            page.wait_for_timeout(300)
            page.screenshot(path=str(out / "graph_page_card.png"))
            shown["graph_page_card.png"] = f"feature panel of {carded}"
        chosen = page.evaluate(_TOP_FEATURES, pins)
        logit = page.evaluate("cltApp.D.nodes.id.filter((id, i) => cltApp.D.nodes.kind[i] === 'l')[0]")
        page.evaluate(
            "ids => { cltApp.select(null); ids.forEach(id => cltApp.state.pinned.push(id));"
            " cltApp.state.view.subgraph_only = true; cltApp.render(); }",
            [*chosen, logit],
        )
        page.wait_for_timeout(300)
        page.screenshot(path=str(out / "graph_page_subgraph.png"))
        scores = [page.get_attribute(f"#clt-score-pinned-{n}", "data-value") for n in ("replacement", "completeness")]
        shown["graph_page_subgraph.png"] = f"{len(chosen)} features and {logit} pinned; scores {scores}"
        browser.close()
    return shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", type=Path, help="a graph page (graph.html)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for the PNG files (default: docs)")
    parser.add_argument("--pins", type=int, default=8, help="features to pin for the subgraph shot (default: 8)")
    args = parser.parse_args()
    for name, what in screenshots(args.page, args.out, args.pins).items():
        print(f"{args.out / name}: {what}")


if __name__ == "__main__":
    main()
