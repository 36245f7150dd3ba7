"""The graph page: its data against the graph, and real clicks in headless Chromium (Playwright)."""

from __future__ import annotations

import base64
import dataclasses
import json

import networkx as nx
import numpy as np
import pytest
import torch
from helpers import cards_with_logits, random_transcoder, saved_store

from clt.attribution import Graph, GraphState, Supernode, attribute, prune, subgraph_scores
from clt.attribution.prune import merged_rows
from clt.viz import GraphPage, graph_page, page_data, save_graph_html

PROMPT = "The for statement iterates over the items"
NODE_T, EDGE_T = 0.99, 0.999  # the random transcoder's features only survive generous pruning
SCRIPT = "<script>alert(1)</script>"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    """A graph of a random transcoder standardised on a tiny store, and the cards of its features."""
    model, tokenizer = tiny_llama
    store = saved_store(model, tokenizer, tmp_path_factory.mktemp("store"), 300)
    tc = random_transcoder(store)
    graph = attribute(PROMPT, model, tc, tokenizer=tokenizer, progress=False)
    cards = cards_with_logits(tc, store, model, tokenizer, top_k=4)
    return graph, cards


@pytest.fixture(scope="module")
def page_file(setup, tmp_path_factory):
    graph, cards = setup
    return save_graph_html(graph, tmp_path_factory.mktemp("page") / "graph.html", **_options(cards))


def _options(cards=None):
    return {"node_threshold": NODE_T, "edge_threshold": EDGE_T, "cards": cards}


def _decode(spec):
    return np.frombuffer(base64.b64decode(spec["data"]), dtype=np.dtype(spec["dtype"]).newbyteorder("<"))


def _page_graph_indices(graph: Graph, data) -> list[int]:
    return [graph.node_index(i) for i in data["nodes"]["id"]]


def test_page_data_is_the_merged_adjacency(setup):
    graph, cards = setup
    data, layout = page_data(graph, **_options(cards))
    index = _page_graph_indices(graph, data)
    nodes = data["nodes"]
    features = [index[k] for k, kind in enumerate(nodes["kind"]) if kind == "f"]
    assert nodes["kind"].count("e") == graph.n_errors and nodes["kind"].count("l") == graph.n_logits
    levels = data["levels"]
    results = [prune(graph, level, EDGE_T) for level in levels]
    kept = torch.stack([r.node_mask for r in results]).any(0)[: graph.n_features]
    assert sorted(features) == kept.nonzero().squeeze(1).tolist()  # every feature kept at some threshold
    for k, result in enumerate(results):
        on_page = {index[j] for j, bits in enumerate(nodes["levels"]) if bits >> k & 1}
        assert on_page == set(result.node_mask.nonzero().squeeze(1).tolist())
    # the two blocks, decoded, are the adjacency with the features not on the page merged into errors
    merged = torch.tensor(sorted(set(range(graph.n_features)) - set(features)), dtype=torch.long)
    rows = torch.tensor([index[r] for r in data["rows"]])
    expected = merged_rows(graph, rows, merged)
    dense = torch.zeros_like(expected)
    kept_edges = [torch.zeros_like(expected, dtype=torch.bool) for _ in levels]
    for name in ("features", "errors"):
        block = data["blocks"][name]
        indptr, indices = _decode(block["indptr"]), _decode(block["indices"])
        values, bits = _decode(block["values"]), _decode(block["levels"])
        assert values.dtype == (np.float32 if name == "features" else np.float64)
        for r in range(len(rows)):
            for k in range(indptr[r], indptr[r + 1]):
                column = index[indices[k]]
                dense[r, column] = float(values[k])
                for level in range(len(levels)):
                    kept_edges[level][r, column] = bool(bits[k] >> level & 1)
    columns = torch.tensor(sorted(index))
    assert torch.equal(dense[:, columns], expected[:, columns])
    for level, result in enumerate(results):
        assert torch.equal(
            kept_edges[level][:, columns], result.edge_mask[rows][:, columns] & (expected[:, columns] != 0)
        )
    assert set(data["cards"]) == {c for c in nodes["card"] if c} and data["cards"]
    assert layout["xaxis"]["ticktext"][1] == graph.tokens[1]


def test_page_of_a_sparse_adjacency(setup):
    """A long prompt's graph holds its adjacency as CSR: its page equals the dense graph's."""
    graph, cards = setup
    sparse = dataclasses.replace(graph, adjacency=graph.adjacency.to_sparse_csr())
    for limits in ({}, {"max_nonzeros": 40}):
        dense_data, _ = page_data(graph, **_options(cards), **limits)
        sparse_data, _ = page_data(sparse, **_options(cards), **limits)
        dense_influence = dense_data["nodes"].pop("infl")  # float32 sums in another order
        assert sparse_data["nodes"].pop("infl") == pytest.approx(dense_influence, rel=1e-5, abs=1e-9)
        assert json.dumps(sparse_data, sort_keys=True) == json.dumps(dense_data, sort_keys=True)


def test_page_limits(setup, caplog):
    graph, _ = setup
    full, _ = page_data(graph, **_options())
    n_full = full["nodes"]["kind"].count("f")
    small, _ = page_data(graph, **_options(), max_features=3)
    assert small["nodes"]["kind"].count("f") == 3 < n_full
    tiny, _ = page_data(graph, **_options(), max_nonzeros=1)
    assert tiny["nodes"]["kind"].count("f") == 0 and "the page holds 0 of" in caplog.text
    with pytest.raises(ValueError, match="at most 8"):
        page_data(graph, thresholds=[0.1 * k for k in range(10)])
    page = graph_page(graph, **_options())
    assert isinstance(page, GraphPage) and page._repr_html_().startswith('<iframe srcdoc="&lt;!DOCTYPE html&gt;')


# ----------------------------------------------------------------------------- in the browser


def _open(browser, path, fragment=""):
    page = browser.new_page(viewport={"width": 1600, "height": 1000}, accept_downloads=True)
    page.errors = []
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    page.add_init_script("window.__alerts = 0; window.alert = function () { window.__alerts++; };")
    page.goto(path.as_uri() + fragment)
    page.wait_for_function("window.cltApp !== undefined")
    return page


def _click(page, node_id, modifier=None):
    position = page.evaluate("id => cltApp.clientPosition(id)", node_id)
    assert position is not None, f"{node_id} is not drawn"
    page.mouse.move(position["x"], position["y"])  # plotly clicks what it hovers: let it hover first
    page.wait_for_function("(cltApp.gd._hoverdata || []).length > 0")
    if modifier:
        page.keyboard.down(modifier)
    page.mouse.click(position["x"], position["y"])
    if modifier:
        page.keyboard.up(modifier)


def _visible_features(page, carded=False) -> list[str]:
    """Ids of the features drawn at the page's threshold, most influential first."""
    return page.evaluate(
        """carded => { const N = cltApp.D.nodes, bit = 1 << cltApp.level();
        return N.id.map((id, i) => i).filter(i => N.kind[i] === 'f' && (N.levels[i] & bit) && (!carded || N.card[i]))
          .sort((a, b) => N.infl[b] - N.infl[a]).map(i => N.id[i]); }""",
        carded,
    )


def _markers(page) -> int:
    return page.evaluate("document.querySelectorAll('.scatterlayer .trace.scatter path.point').length")


def test_clicking_a_feature_shows_its_card(browser, setup, page_file):
    graph, cards = setup
    page = _open(browser, page_file)
    assert _markers(page) == int(prune(graph, NODE_T, EDGE_T).node_mask.sum())
    node_id = _visible_features(page, carded=True)[0]
    _click(page, node_id)
    assert page.evaluate("cltApp.selected") == node_id
    _, layer, _, feature = node_id.split(":")
    card = cards.card(int(layer), int(feature))
    first = page.locator("#clt-node .clt-context").first.text_content()
    assert "".join(card.contexts[0].tokens).replace("\n", "↵") in first
    panel = page.inner_text("#clt-node")
    assert card.top_logits[0][0].strip() in panel and "density" in panel and card.label in panel
    assert page.locator("#clt-node .clt-hist .main-svg").count() > 0  # the histogram is drawn
    assert page.locator("#clt-inputs li").count() > 0 and page.locator("#clt-outputs li").count() > 0
    assert page.errors == []


def test_pinned_subgraph_scores_equal_python(browser, setup, page_file):
    graph, _ = setup
    page = _open(browser, page_file)
    pinned = _visible_features(page)[:3]
    for node_id in pinned:
        _click(page, node_id, "Control")
    assert page.evaluate("cltApp.state.pinned") == pinned
    shown = [
        float(page.get_attribute(f"#clt-score-pinned-{name}", "data-value")) for name in ("replacement", "completeness")
    ]
    assert shown == pytest.approx(subgraph_scores(graph, pinned), abs=1e-6)
    page_features = [
        i for i, kind in zip(page.evaluate("cltApp.D.nodes.id"), page.evaluate("cltApp.D.nodes.kind")) if kind == "f"
    ]
    on_page = [
        float(page.get_attribute(f"#clt-score-page-{name}", "data-value")) for name in ("replacement", "completeness")
    ]
    assert on_page == pytest.approx(subgraph_scores(graph, page_features), abs=1e-6)
    _click(page, pinned[1], "Control")  # unpin one
    shown = [
        float(page.get_attribute(f"#clt-score-pinned-{name}", "data-value")) for name in ("replacement", "completeness")
    ]
    assert shown == pytest.approx(subgraph_scores(graph, [pinned[0], pinned[2]]), abs=1e-6)
    assert page.errors == []


def test_grouping_two_nodes_gives_one_supernode_with_summed_edges(browser, setup, page_file):
    graph, _ = setup
    page = _open(browser, page_file)
    a, b = _visible_features(page)[:2]
    before = _markers(page)
    for node_id in (a, b):
        _click(page, node_id, "Control")
    page.fill("#clt-group-label", "my group")
    page.click("#clt-group")
    supernodes = page.evaluate("cltApp.state.supernodes")
    assert supernodes == [{"id": "supernode:1", "label": "my group", "members": [a, b]}]
    assert _markers(page) == before - 1 and page.evaluate("cltApp.state.pinned") == ["supernode:1"]
    assert page.evaluate("cltApp.selected") == "supernode:1"
    # expected sums: rows/columns of a and b in the page's matrix (features off the page merged into errors)
    data = page.evaluate("cltApp.D")
    index = _page_graph_indices(graph, data)
    off_page = sorted(
        set(range(graph.n_features)) - {index[k] for k, kind in enumerate(data["nodes"]["kind"]) if kind == "f"}
    )
    members = torch.tensor([graph.node_index(a), graph.node_index(b)])
    inputs = merged_rows(graph, members, torch.tensor(off_page, dtype=torch.long)).sum(0)
    outputs = graph.adjacency[:, members].double().sum(1)
    for list_id, sums in (("#clt-inputs", inputs), ("#clt-outputs", outputs)):
        rows = page.locator(f"{list_id} li").evaluate_all(
            "items => items.map(li => [li.dataset.id, li.dataset.weight])"
        )
        assert rows
        for node_id, weight in rows:
            assert float(weight) == pytest.approx(float(sums[graph.node_index(node_id)]), abs=1e-12), node_id
    on_page = torch.zeros(graph.n_nodes, dtype=torch.bool)
    on_page[index] = True
    on_page[members] = False
    assert page.evaluate("cltApp.connections('supernode:1').outputs.length") == int(((outputs != 0) & on_page).sum())
    page.click("#clt-ungroup")
    assert page.evaluate("cltApp.state.supernodes") == [] and _markers(page) == before
    assert page.evaluate("cltApp.state.pinned") == [a, b]
    # auto-group applies the suggestions computed offline (those with two members shown)
    suggestions = page.evaluate("cltApp.D.suggestions")
    page.click("#clt-auto-group")
    made = page.evaluate("cltApp.state.supernodes")
    assert [[s["label"], s["members"]] for s in made] == suggestions  # all members are shown here
    assert f"{len(made)} supernodes made from {len(suggestions)} suggestions" in page.inner_text("#clt-status")
    assert _markers(page) == before - sum(len(m) - 1 for _, m in suggestions)
    assert page.errors == []


def test_saved_state_restores_pins_and_labels(browser, setup, page_file, tmp_path):
    graph, _ = setup
    page = _open(browser, page_file)
    a, b, c = _visible_features(page)[:3]
    _click(page, a, "Control")
    _click(page, b, "Control")
    _click(page, c)
    label = "my <b>label</b>"
    page.fill("#clt-label-input", label)
    page.press("#clt-label-input", "Enter")
    with page.expect_download() as download:
        page.click("#clt-save")
    saved = tmp_path / "state.json"
    download.value.save_as(saved)
    assert "#state=" in page.url
    state = graph.load_state(saved)
    assert state.pinned == [a, b] and state.labels == {c: label} and state.view["selected"] == c
    assert graph.load_state(page.url) == state
    page.reload()
    page.wait_for_function("window.cltApp !== undefined")
    assert page.evaluate("cltApp.state.pinned") == [a, b]
    assert page.evaluate(f"cltApp.labelOf({json.dumps(c)})") == label
    assert page.input_value("#clt-label-input") == label  # the selection came back too
    fresh = _open(browser, page_file)
    assert fresh.evaluate("cltApp.state.pinned") == []
    fresh.set_input_files("#clt-load", str(saved))
    fresh.wait_for_function("cltApp.state.pinned.length === 2")
    assert fresh.evaluate(f"cltApp.labelOf({json.dumps(c)})") == label
    assert page.errors == [] and fresh.errors == []


def test_a_state_made_in_python_opens_in_the_page(browser, setup, page_file):
    graph, _ = setup
    page = _open(browser, page_file)
    a, b, c = _visible_features(page)[:3]
    state = GraphState(
        pinned=["supernode:3", c], supernodes=[Supernode("supernode:3", "pair", [a, b])], labels={c: "x"}
    )
    opened = _open(browser, page_file, "#" + state.to_fragment())
    assert opened.evaluate("cltApp.state.supernodes")[0]["members"] == [a, b]
    assert opened.evaluate("cltApp.state.pinned") == ["supernode:3", c]
    shown = [
        float(opened.get_attribute(f"#clt-score-pinned-{n}", "data-value")) for n in ("replacement", "completeness")
    ]
    assert shown == pytest.approx(subgraph_scores(graph, state.pinned_nodes()), abs=1e-6)
    assert opened.errors == []


def test_clicks_highlight_upstream_and_downstream(browser, setup, tmp_path):
    graph, _ = setup
    pruned = prune(graph, NODE_T, EDGE_T)
    small = graph.to_networkx(pruned.node_mask, pruned.edge_mask)
    node = next(
        n
        for n, kind in small.nodes(data="kind")
        if kind == "feature" and nx.ancestors(small, n) and nx.descendants(small, n)
    )
    page = _open(browser, save_graph_html(graph, tmp_path / "page.html", **_options()))
    bright = """() => { const ids = [];
      cltApp.gd.data.forEach(t => { if (t.meta !== 'nodes') return;
        t.customdata.forEach((c, i) => { const op = t.marker.opacity;
          if ((Array.isArray(op) ? op[i] : op) > 0.5) ids.push(c); }); });
      return ids; }"""
    _click(page, node)
    up = nx.ancestors(small, node) | {node}
    assert set(page.evaluate(bright)) == up | nx.descendants(small, node)
    page.select_option("#clt-link", "up")
    assert set(page.evaluate(bright)) == up
    page.select_option("#clt-link", "down")
    assert set(page.evaluate(bright)) == nx.descendants(small, node) | {node}
    _click(page, node)  # clicking it again clears the selection
    assert len(page.evaluate(bright)) == int(pruned.node_mask.sum())
    page.check("#clt-hide-errors")
    errors = int(pruned.node_mask[graph.error_slice].sum())
    assert _markers(page) == int(pruned.node_mask.sum()) - errors
    assert page.errors == []


def test_tokens_show_as_text(browser, setup, tmp_path):
    graph, cards = setup
    tokens = list(graph.tokens)
    tokens[2] = SCRIPT
    evil = dataclasses.replace(graph, tokens=tokens, prompt="".join(tokens))
    label = "a </script><script>alert(2)</script> label"
    token_node = f"token:{2}"
    path = save_graph_html(evil, tmp_path / "evil.html", **_options(cards), labels={token_node: label}, title=SCRIPT)
    text = path.read_text()
    assert SCRIPT not in text and "alert(2)</script>" not in text
    page = _open(browser, path)
    assert page.evaluate("document.querySelectorAll('.xtick text')[2].textContent") == SCRIPT
    assert page.text_content("#clt-title") == SCRIPT
    _click(page, token_node)
    assert page.input_value("#clt-label-input") == label
    assert SCRIPT in page.inner_text("#clt-node")
    assert page.evaluate("window.__alerts") == 0 and page.errors == []
