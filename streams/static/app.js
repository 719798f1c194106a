/* edgebill parity dashboard: draws /dashboard/data.json as inline SVG. No external library (the
 * network is closed and the page's CSP allows only this origin). The first render uses the data
 * embedded in the page, so the chart is there on load; it then refreshes every 15 s. */
(function () {
  "use strict";
  var SVGNS = "http://www.w3.org/2000/svg";

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    setAttrs(e, attrs);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function svg(tag, attrs, text) {
    var e = document.createElementNS(SVGNS, tag);
    setAttrs(e, attrs);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function setAttrs(e, attrs) {
    if (!attrs) return;
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, String(attrs[k])); });
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function fmt(n) { return Number(n).toLocaleString("en-US", { maximumFractionDigits: 3 }); }
  function pct(d) { return (d >= 0 ? "+" : "") + (d * 100).toFixed(2) + "%"; }
  function utc(ms) { return ms ? new Date(ms).toISOString().replace(".000Z", "Z") : "–"; }
  function niceMax(v) {
    if (!(v > 0)) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) if (steps[i] * p >= v) return steps[i] * p;
    return 10 * p;
  }

  function renderGate(data) {
    var g = data.gate, host = document.getElementById("gate");
    clear(host);
    host.className = "gate " + (g.open ? "open" : "closed");
    host.appendChild(el("span", { "class": "big", id: "clean-hours" }, fmt(g.clean_hours)));
    host.appendChild(document.createTextNode(
      "consecutive clean hours of parity — cutover gate " + (g.open ? "OPEN" : "closed") +
      " (needs " + g.required_hours + " h; tolerance " + (Number(data.tolerance) * 100).toFixed(1) + "%)" +
      (g.last_flagged !== null ? " · last flagged bucket " + utc(g.last_flagged * 1000) : "")));
  }

  function renderChart(data) {
    var host = document.getElementById("chart");
    clear(host);
    var buckets = data.buckets;
    var W = Math.max(640, host.clientWidth || 960), H = 300, m = { l: 64, r: 12, t: 16, b: 40 };
    var iw = W - m.l - m.r, ih = H - m.t - m.b;
    var maxV = niceMax(buckets.reduce(function (a, b) { return Math.max(a, b.edge, b.cell); }, 0) * 1.05);
    var root = svg("svg", { id: "chart-svg", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "edge and cell GB-seconds per bucket" });
    for (var t = 0; t <= 4; t++) {
      var v = maxV * t / 4, y = m.t + ih - ih * t / 4;
      root.appendChild(svg("line", { "class": "grid", x1: m.l, x2: W - m.r, y1: y, y2: y }));
      root.appendChild(svg("text", { x: m.l - 6, y: y + 4, "text-anchor": "end" }, fmt(v)));
    }
    root.appendChild(svg("line", { "class": "axis", x1: m.l, x2: W - m.r, y1: m.t + ih, y2: m.t + ih }));
    var n = Math.max(1, buckets.length), slot = iw / n, bw = Math.max(1, slot * 0.36);
    var every = Math.max(1, Math.ceil(n / 12));
    buckets.forEach(function (b, i) {
      var x0 = m.l + i * slot + slot * 0.12;
      var g = svg("g", { "class": "bucket", "data-start": b.start });
      var cls = b.settled ? "" : " unsettled";
      var he = ih * b.edge / maxV, hc = ih * b.cell / maxV;
      var re = svg("rect", { "class": "bar edge" + cls, x: x0, y: m.t + ih - he, width: bw, height: he,
        "data-value": b.edge });
      re.appendChild(svg("title", null, b.label + " edge " + fmt(b.edge) + " GB-s"));
      var rc = svg("rect", { "class": "bar cell" + cls, x: x0 + bw, y: m.t + ih - hc, width: bw, height: hc,
        "data-value": b.cell });
      rc.appendChild(svg("title", null, b.label + " cell " + fmt(b.cell) + " GB-s, drift " + pct(b.drift) +
        ", " + b.flagged + " of " + b.orgs + " orgs flagged" + (b.settled ? "" : " (not settled)")));
      g.appendChild(re);
      g.appendChild(rc);
      if (b.flagged > 0) {
        var f = svg("circle", { "class": "flag", cx: x0 + bw, cy: m.t + ih - Math.max(he, hc) - 8, r: 5,
          "data-flagged": b.flagged });
        f.appendChild(svg("title", null, b.flagged + " org(s) flagged"));
        g.appendChild(f);
      }
      if (i % every === 0) {
        g.appendChild(svg("text", { x: x0 + bw, y: H - m.b + 16, "text-anchor": "middle" }, b.label));
      }
      root.appendChild(g);
    });
    host.appendChild(root);
  }

  function renderDrift(data) {
    var host = document.getElementById("drift-chart");
    clear(host);
    var buckets = data.buckets.filter(function (b) { return b.orgs > 0; });
    var W = Math.max(640, host.clientWidth || 960), H = 140, m = { l: 64, r: 12, t: 10, b: 20 };
    var iw = W - m.l - m.r, ih = H - m.t - m.b;
    var tol = Number(data.tolerance);
    var lim = Math.max(tol * 2, buckets.reduce(function (a, b) { return Math.max(a, Math.abs(b.drift)); }, 0) * 1.1);
    var root = svg("svg", { id: "drift-svg", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "aggregate drift per bucket" });
    function yOf(d) { return m.t + ih / 2 - (ih / 2) * d / lim; }
    root.appendChild(svg("line", { "class": "axis", x1: m.l, x2: W - m.r, y1: yOf(0), y2: yOf(0) }));
    [tol, -tol].forEach(function (d) {
      root.appendChild(svg("line", { "class": "tol", x1: m.l, x2: W - m.r, y1: yOf(d), y2: yOf(d) }));
      root.appendChild(svg("text", { x: m.l - 6, y: yOf(d) + 4, "text-anchor": "end" }, pct(d)));
    });
    var all = data.buckets, n = Math.max(1, all.length), slot = iw / n, pts = [];
    all.forEach(function (b, i) {
      if (b.orgs === 0) return;
      var x = m.l + i * slot + slot / 2, y = yOf(b.drift);
      pts.push(x.toFixed(1) + "," + y.toFixed(1));
      var c = svg("circle", { "class": "point" + (Math.abs(b.drift) > tol ? " bad" : ""), cx: x, cy: y, r: 3.5,
        "data-start": b.start, "data-drift": b.drift });
      c.appendChild(svg("title", null, b.label + " aggregate drift " + pct(b.drift)));
      root.appendChild(c);
    });
    if (pts.length > 1) root.insertBefore(svg("polyline", { "class": "line", points: pts.join(" ") }), root.firstChild);
    host.appendChild(root);
  }

  function renderWorst(data) {
    var body = document.querySelector("#worst tbody");
    clear(body);
    if (!data.worst.length) {
      var tr = el("tr");
      tr.appendChild(el("td", { colspan: 6, "class": "empty" }, "no flagged org in settled buckets"));
      body.appendChild(tr);
      return;
    }
    data.worst.forEach(function (w) {
      var tr = el("tr", { "class": "worst-row" });
      tr.appendChild(el("td", null, w.org_id));
      tr.appendChild(el("td", null, w.label));
      tr.appendChild(el("td", null, fmt(w.edge)));
      tr.appendChild(el("td", null, fmt(w.cell)));
      tr.appendChild(el("td", null, pct(w.drift)));
      tr.appendChild(el("td", { "class": w.status }, w.status));
      body.appendChild(tr);
    });
  }

  function renderHeatmap(data) {
    var table = document.getElementById("orgs");
    clear(table);
    var buckets = data.buckets.filter(function (b) { return b.orgs > 0; });
    var head = el("tr");
    head.appendChild(el("th", null, "org"));
    buckets.forEach(function (b) { head.appendChild(el("th", null, b.label)); });
    var thead = el("thead");
    thead.appendChild(head);
    table.appendChild(thead);
    var tbody = el("tbody");
    data.orgs.forEach(function (o) {
      var tr = el("tr", { "class": "org-row", "data-org": o.org_id });
      tr.appendChild(el("td", null, o.org_id));
      buckets.forEach(function (b) {
        var c = o.cells[String(b.start)];
        if (!c) { tr.appendChild(el("td", { "class": "none" }, "·")); return; }
        var td = el("td", { "class": c.status, title: "edge " + fmt(c.edge) + " / cell " + fmt(c.cell) + " GB-s" },
          c.status === "ok" ? pct(c.drift) : c.status + " " + pct(c.drift));
        tr.appendChild(td);
      });
      tbody.appendChild(tr);
    });
    table.appendChild(tbody);
  }

  function renderSide(data) {
    var body = document.querySelector("#lag tbody");
    clear(body);
    data.lag.forEach(function (l) {
      var tr = el("tr");
      tr.appendChild(el("td", null, l.topic));
      tr.appendChild(el("td", null, l.partition));
      tr.appendChild(el("td", null, fmt(l.lag)));
      body.appendChild(tr);
    });
    var ul = document.getElementById("alerts");
    clear(ul);
    if (!data.alerts.length) ul.appendChild(el("li", { "class": "empty" }, "none"));
    data.alerts.forEach(function (a) {
      ul.appendChild(el("li", null, a.id + " (from " + utc(a.first_bucket * 1000) + ")" +
        (a.published ? "" : " — not yet published")));
    });
    var meta = document.getElementById("meta");
    meta.textContent = "refreshed " + utc(data.refreshed_ms) + " · settled up to " + utc(data.watermark_ms) +
      " · bucket " + data.bucket_seconds + " s";
  }

  function render(data) {
    renderGate(data);
    renderChart(data);
    renderDrift(data);
    renderWorst(data);
    renderHeatmap(data);
    renderSide(data);
    document.body.setAttribute("data-rendered", String(data.buckets.length));
  }

  function refresh() {
    fetch("/dashboard/data.json", { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (d) { if (d) render(d); })
      .catch(function () { /* keep the last picture */ });
  }

  var initial = document.getElementById("initial-data");
  render(JSON.parse(initial.textContent));
  window.setInterval(refresh, 15000);
})();
