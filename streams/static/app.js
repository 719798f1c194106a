/* edgebill parity dashboard: draws /dashboard/data.json as inline SVG. No external library (the
 * network is closed and the page's CSP allows only this origin). The first render uses the data
 * embedded in the page, so the chart is there on load; it then refreshes every 15 s.
 *
 * Charts take the width of their panel (down to a phone's), so the page never scrolls sideways; wide
 * tables scroll inside their own box. Hovering a bucket names its flagged orgs; clicking it lists every
 * org of that bucket and marks its column in the drift table. The aggregate drift axis is scaled to the
 * buckets without their single largest drift when that one is far off (a point off the scale is drawn at
 * the edge, marked, and keeps its value in its tooltip), and buckets without data are gaps in the line.
 * The reconciliation panel lists the last scheduled run's windows that differ from Stripe, with their likely
 * causes, and the upcoming invoices' usage lines checked against the ledger (exact decimal strings). */
(function () {
  "use strict";
  var SVGNS = "http://www.w3.org/2000/svg";
  var state = { data: null, selected: null, org: null };  // the clicked bucket (its start) and org

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
  function short(n) {  // axis labels on a narrow chart: 200k, 1.5M
    var a = Math.abs(n);
    if (a >= 1e9) return +(n / 1e9).toFixed(1) + "G";
    if (a >= 1e6) return +(n / 1e6).toFixed(1) + "M";
    if (a >= 1e3) return +(n / 1e3).toFixed(1) + "k";
    return fmt(n);
  }
  function niceMax(v) {
    if (!(v > 0)) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) if (steps[i] * p >= v) return steps[i] * p;
    return 10 * p;
  }
  function widthOf(host) {
    var w = host.clientWidth || (host.parentNode && host.parentNode.clientWidth) || 960;
    return Math.max(240, Math.floor(w));
  }

  // ---------------------------------------------------------------------------------- tooltip

  function bucketLines(b) {
    var lines = [b.label + " UTC" + (b.settled ? "" : " (not settled)"),
      "edge " + fmt(b.edge) + " GB-s · cell " + fmt(b.cell) + " GB-s · drift " + pct(b.drift)];
    if (b.orgs === 0) {
      lines.push("no data in this bucket");
    } else if (b.flagged > 0) {
      var names = (b.flagged_orgs || []).join(", ");
      var more = b.flagged - (b.flagged_orgs || []).length;
      lines.push(b.flagged + " of " + b.orgs + " orgs flagged: " + names + (more > 0 ? " and " + more + " more" : ""));
    } else {
      lines.push("no org flagged (" + b.orgs + " orgs)");
    }
    return lines;
  }

  function showTip(evt, lines) {
    var tip = document.getElementById("tip");
    clear(tip);
    lines.forEach(function (line, i) { tip.appendChild(el("div", i === 0 ? { "class": "tip-head" } : null, line)); });
    tip.hidden = false;
    var x = evt.clientX, y = evt.clientY;
    if (x === undefined || (x === 0 && y === 0)) {  // keyboard focus: next to the element
      var r = evt.target.getBoundingClientRect();
      x = r.left + r.width / 2;
      y = r.top;
    }
    var tw = tip.offsetWidth, th = tip.offsetHeight;
    var left = Math.min(Math.max(4, x + 12), window.innerWidth - tw - 4);
    var top = y + 16 + th > window.innerHeight ? y - th - 12 : y + 16;
    tip.style.left = Math.max(4, left) + "px";
    tip.style.top = Math.max(4, top) + "px";
  }
  function hideTip() { document.getElementById("tip").hidden = true; }

  function interactive(node, b) {
    node.setAttribute("tabindex", "0");
    node.setAttribute("role", "button");
    node.setAttribute("aria-label", bucketLines(b).join(". "));
    node.addEventListener("mouseenter", function (e) { showTip(e, bucketLines(b)); });
    node.addEventListener("mousemove", function (e) { showTip(e, bucketLines(b)); });
    node.addEventListener("mouseleave", hideTip);
    node.addEventListener("focus", function (e) { showTip(e, bucketLines(b)); });
    node.addEventListener("blur", hideTip);
    node.addEventListener("click", function () { select(b.start); });
    node.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); select(b.start); }
    });
  }

  function select(start) {
    state.selected = state.selected === start ? null : start;
    render(state.data);
  }

  // ---------------------------------------------------------------------------------- charts

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
    var W = widthOf(host), narrow = W < 560, H = narrow ? 220 : 300;
    var m = { l: narrow ? 48 : 64, r: 8, t: 16, b: 40 };
    var iw = W - m.l - m.r, ih = H - m.t - m.b;
    var maxV = niceMax(buckets.reduce(function (a, b) { return Math.max(a, b.edge, b.cell); }, 0) * 1.05);
    var root = svg("svg", { id: "chart-svg", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "edge and cell GB-seconds per bucket" });
    for (var t = 0; t <= 4; t++) {
      var v = maxV * t / 4, y = m.t + ih - ih * t / 4;
      root.appendChild(svg("line", { "class": "grid", x1: m.l, x2: W - m.r, y1: y, y2: y }));
      root.appendChild(svg("text", { x: m.l - 6, y: y + 4, "text-anchor": "end" }, narrow ? short(v) : fmt(v)));
    }
    root.appendChild(svg("line", { "class": "axis", x1: m.l, x2: W - m.r, y1: m.t + ih, y2: m.t + ih }));
    var n = Math.max(1, buckets.length), slot = iw / n, bw = Math.max(1, slot * 0.36);
    var every = Math.max(1, Math.ceil(n / Math.max(2, Math.floor(iw / 72))));
    buckets.forEach(function (b, i) {
      var x0 = m.l + i * slot + slot * 0.12;
      var g = svg("g", { "class": "bucket" + (state.selected === b.start ? " selected" : ""), "data-start": b.start });
      // The whole column answers the pointer, not only the bars (a short bar is hard to hit).
      g.appendChild(svg("rect", { "class": "hit", x: m.l + i * slot, y: m.t, width: slot, height: ih }));
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
        f.appendChild(svg("title", null, b.flagged + " org(s) flagged: " + (b.flagged_orgs || []).join(", ")));
        g.appendChild(f);
      }
      if (i % every === 0) {
        g.appendChild(svg("text", { x: x0 + bw, y: H - m.b + 16, "text-anchor": "middle" }, b.label));
      }
      interactive(g, b);
      root.appendChild(g);
    });
    host.appendChild(root);
  }

  /* The axis half-height: the largest |drift| plus a margin, never less than twice the tolerance. When the
   * largest (the top 5 %, at least one bucket) would squeeze the others into a third of the chart or less, the
   * others decide the axis and those points are drawn clipped at its edge. */
  function driftLimit(values, tol) {
    var abs = values.map(Math.abs).sort(function (a, b) { return a - b; });
    var floor = tol * 2;
    if (!abs.length) return floor;
    var full = Math.max(floor, abs[abs.length - 1] * 1.1);
    var drop = Math.max(1, Math.floor(abs.length * 0.05));
    if (abs.length <= drop) return full;
    var robust = Math.max(floor, abs[abs.length - 1 - drop] * 1.25);
    return full > 3 * robust ? robust : full;
  }

  function renderDrift(data) {
    var host = document.getElementById("drift-chart");
    clear(host);
    var all = data.buckets;
    var W = widthOf(host), narrow = W < 560, H = 150, m = { l: narrow ? 48 : 64, r: 8, t: 12, b: 22 };
    var iw = W - m.l - m.r, ih = H - m.t - m.b;
    var tol = Number(data.tolerance);
    var lim = driftLimit(all.filter(function (b) { return b.orgs > 0; }).map(function (b) { return b.drift; }), tol);
    var root = svg("svg", { id: "drift-svg", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "aggregate drift per bucket" });
    function yOf(d) { return m.t + ih / 2 - (ih / 2) * Math.max(-lim, Math.min(lim, d)) / lim; }
    var n = Math.max(1, all.length), slot = iw / n;
    var lines = svg("g", { "class": "lines" });
    root.appendChild(lines);
    root.appendChild(svg("line", { "class": "axis", x1: m.l, x2: W - m.r, y1: yOf(0), y2: yOf(0) }));
    [tol, -tol].forEach(function (d) {
      root.appendChild(svg("line", { "class": "tol", x1: m.l, x2: W - m.r, y1: yOf(d), y2: yOf(d) }));
      root.appendChild(svg("text", { x: m.l - 6, y: yOf(d) + 4, "text-anchor": "end" }, pct(d)));
    });
    [lim, -lim].forEach(function (d) {
      root.appendChild(svg("text", { "class": "lim", x: m.l - 6, y: yOf(d) + 4, "text-anchor": "end" }, pct(d)));
    });
    var segments = [], current = [], clipped = 0;
    all.forEach(function (b, i) {
      var x = m.l + i * slot + slot / 2;
      if (b.orgs === 0) {  // no data: a gap, not a zero
        if (current.length) segments.push(current);
        current = [];
        var gap = svg("rect", { "class": "gap", x: m.l + i * slot, y: m.t, width: slot, height: ih,
          "data-start": b.start });
        gap.appendChild(svg("title", null, b.label + " no data"));
        root.appendChild(gap);
        return;
      }
      var off = Math.abs(b.drift) > lim, y = yOf(b.drift);
      current.push(x.toFixed(1) + "," + y.toFixed(1));
      var c = svg("circle", { "class": "point" + (Math.abs(b.drift) > tol ? " bad" : "") + (off ? " clipped" : "") +
        (state.selected === b.start ? " selected" : ""), cx: x, cy: y, r: 3.5,
        "data-start": b.start, "data-drift": b.drift });
      c.appendChild(svg("title", null, b.label + " aggregate drift " + pct(b.drift) + (off ? " (off the scale)" : "")));
      interactive(c, b);
      root.appendChild(c);
      if (off) {  // an arrow at the edge, pointing the way the point is off the scale
        clipped += 1;
        var up = b.drift > 0, tip = up ? m.t : m.t + ih, base = up ? tip + 8 : tip - 8;
        root.appendChild(svg("path", { "class": "clip-mark", "data-start": b.start,
          d: "M" + (x - 5) + "," + base + " L" + x + "," + tip + " L" + (x + 5) + "," + base + " Z" }));
        var right = x + 8 + 60 < W - m.r;  // its value beside the arrow, on the side with room
        root.appendChild(svg("text", { "class": "clip-value", x: right ? x + 8 : x - 8, y: up ? tip + 9 : tip - 2,
          "text-anchor": right ? "start" : "end" }, pct(b.drift)));
      }
    });
    if (current.length) segments.push(current);
    segments.forEach(function (pts) {
      if (pts.length > 1) lines.appendChild(svg("polyline", { "class": "line", points: pts.join(" ") }));
    });
    host.appendChild(root);
    document.getElementById("drift-note").textContent = clipped
      ? "· " + clipped + " bucket" + (clipped > 1 ? "s" : "") + " off the scale (axis ±" + (lim * 100).toFixed(1) +
        "%; hover for the value)"
      : "";
  }

  // ---------------------------------------------------------------------------------- tables

  function renderDetail(data) {
    var box = document.getElementById("bucket-detail");
    var b = data.buckets.filter(function (x) { return x.start === state.selected; })[0];
    if (!b) { box.hidden = true; state.selected = null; return; }
    box.hidden = false;
    document.getElementById("bucket-detail-title").textContent =
      "Bucket " + b.label + " UTC: " + b.orgs + " orgs, " + b.flagged + " flagged, drift " + pct(b.drift);
    var body = document.querySelector("#bucket-orgs tbody");
    clear(body);
    var rows = [];
    data.orgs.forEach(function (o) {
      var c = o.cells[String(b.start)];
      if (c) rows.push({ org: o.org_id, c: c });
    });
    rows.sort(function (a, z) {
      var fa = a.c.status === "ok" ? 1 : 0, fz = z.c.status === "ok" ? 1 : 0;
      return fa - fz || Math.abs(z.c.drift) - Math.abs(a.c.drift) || (a.org < z.org ? -1 : 1);
    });
    if (!rows.length) {
      var tr = el("tr");
      tr.appendChild(el("td", { colspan: 5, "class": "empty" }, "no org has data in this bucket"));
      body.appendChild(tr);
    }
    rows.forEach(function (r) {
      var tr = el("tr", { "class": "bucket-org", "data-org": r.org });
      tr.appendChild(el("td", null, r.org));
      tr.appendChild(el("td", null, fmt(r.c.edge)));
      tr.appendChild(el("td", null, fmt(r.c.cell)));
      tr.appendChild(el("td", null, pct(r.c.drift)));
      tr.appendChild(el("td", { "class": r.c.status }, r.c.status));
      body.appendChild(tr);
    });
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
      tr.addEventListener("click", function () { showOrg(w.org_id, w.bucket_start); });
      body.appendChild(tr);
    });
  }

  function showOrg(org, start) {
    state.selected = start;
    state.org = org;
    render(state.data);
    var row = document.querySelector("#orgs tr.picked");
    if (row && row.scrollIntoView) row.scrollIntoView({ block: "nearest" });
  }

  function renderHeatmap(data) {
    var table = document.getElementById("orgs");
    clear(table);
    var buckets = data.buckets.filter(function (b) { return b.orgs > 0; });
    var head = el("tr");
    head.appendChild(el("th", null, "org"));
    buckets.forEach(function (b) {
      var th = el("th", { "data-start": b.start, "class": state.selected === b.start ? "sel" : "" }, b.label);
      th.addEventListener("click", function () { select(b.start); });
      head.appendChild(th);
    });
    var thead = el("thead");
    thead.appendChild(head);
    table.appendChild(thead);
    var tbody = el("tbody");
    data.orgs.forEach(function (o) {
      var tr = el("tr", { "class": "org-row", "data-org": o.org_id });
      if (state.org === o.org_id) tr.classList.add("picked");
      tr.appendChild(el("td", null, o.org_id));
      buckets.forEach(function (b) {
        var c = o.cells[String(b.start)], sel = state.selected === b.start ? " sel" : "";
        if (!c) { tr.appendChild(el("td", { "class": "none" + sel }, "·")); return; }
        var td = el("td", { "class": c.status + sel, title: "edge " + fmt(c.edge) + " / cell " + fmt(c.cell) + " GB-s" },
          c.status === "ok" ? pct(c.drift) : c.status + " " + pct(c.drift));
        tr.appendChild(td);
      });
      tbody.appendChild(tr);
    });
    table.appendChild(tbody);
  }

  // ---------------------------------------------------------------------- reconciliation with Stripe

  var LABEL_TEXT = { ok: "ok", short: "short", over: "over", unknown_customer: "unknown customer",
    meter_misconfigured: "meter misconfigured" };

  function day(s) { return new Date(s * 1000).toISOString().slice(0, s % 86400 ? 16 : 10).replace("T", " "); }

  function renderReconcile(data) {
    var r = data.reconcile, sum = document.getElementById("reconcile-summary");
    var body = document.querySelector("#reconcile tbody"), inv = document.querySelector("#invoices tbody");
    clear(sum); clear(body); clear(inv);
    if (!r || !r.last_run) {
      sum.className = "recon-summary none";
      sum.appendChild(el("span", null, "no reconciliation yet (the leader runs it on a schedule once it sends to Stripe)"));
      body.appendChild(emptyRow(8, "nothing compared yet"));
      inv.appendChild(emptyRow(7, "no invoice checked yet"));
      var none = document.querySelector("#repairs tbody");
      clear(none);
      none.appendChild(emptyRow(6, "no repair yet"));
      return;
    }
    var run = r.last_run, bad = run.error || run.differences > 0 || run.invoice_differences > 0;
    sum.className = "recon-summary " + (bad ? "bad" : "ok");
    sum.setAttribute("data-differences", String(run.differences));
    var labels = Object.keys(r.by_label).map(function (k) { return (LABEL_TEXT[k] || k) + " " + r.by_label[k]; });
    var nothing = !run.error && !run.compared;
    if (nothing) sum.className = "recon-summary bad";
    sum.appendChild(el("span", { "class": "big", id: "reconcile-differences" }, String(run.differences)));
    sum.appendChild(document.createTextNode(
      (run.error ? "the last run could not read Stripe: " + run.error :
        nothing ? "window(s) differ: the last run compared NOTHING" +
          (run.unsettled ? " (" + run.unsettled + " window(s) not settled yet)" : " (nothing sent in the lookback)") :
        "window(s) differ of " + run.compared + " compared" + (labels.length ? " (" + labels.join(", ") + ")" : "") +
        (run.unsettled ? " · " + run.unsettled + " not settled yet" : "")) +
      " · last run " + utc(run.finished_ms) + " · " + run.requests + " Stripe request(s)" +
      (run.throttled ? ", " + run.throttled + " throttled" : "") +
      (r.alerts.length ? " · " + r.alerts.length + " alert(s)" : "") +
      (r.repairs ? " · " + r.repairs + " repair(s)" : "")));
    sum.appendChild(el("span", { id: "reconcile-newest", "class": "newest" },
      " · newest window compared: " + (r.newest_compared ? utc(r.newest_compared * 1000) : "none yet")));
    if (!r.differences.length) body.appendChild(emptyRow(8, nothing ? "nothing compared" : "every compared window matches Stripe"));
    r.differences.forEach(function (d) {
      var tr = el("tr", { "class": "recon-row", "data-org": d.org_id, "data-label": d.label });
      tr.appendChild(el("td", null, day(d.window_start)));
      tr.appendChild(el("td", null, d.org_id));
      tr.appendChild(el("td", { title: "customer " + d.customer }, d.meter));
      tr.appendChild(el("td", null, d.ledger));
      tr.appendChild(el("td", null, d.stripe === null ? "–" : d.stripe));
      tr.appendChild(el("td", { "class": "label " + d.label }, LABEL_TEXT[d.label] || d.label));
      tr.appendChild(el("td", null, d.streak));
      var causes = el("td", { "class": "cause" });
      d.causes.forEach(function (c) {
        causes.appendChild(el("div", { title: c.explains, "data-cause": c.cause },
          c.cause.replace(/_/g, " ") + (c.value !== "0" ? " " + c.value : "") + (c.rows ? " (" + c.rows + " row" + (c.rows > 1 ? "s" : "") + ")" : "")));
      });
      tr.appendChild(causes);
      body.appendChild(tr);
    });
    var rep = document.querySelector("#repairs tbody");
    clear(rep);
    if (!r.recent_repairs || !r.recent_repairs.length) rep.appendChild(emptyRow(6, "no repair yet"));
    (r.recent_repairs || []).forEach(function (p) {
      var tr = el("tr", { "class": "repair-row", "data-action": p.action });
      tr.appendChild(el("td", null, utc(p.created_ms)));
      tr.appendChild(el("td", null, p.action.replace(/_/g, " ")));
      tr.appendChild(el("td", { title: p.new_row || "" }, p.row));
      tr.appendChild(el("td", null, p.hour !== null && p.hour !== undefined ? day(p.hour) : "–"));
      tr.appendChild(el("td", null, p.value));
      tr.appendChild(el("td", { title: p.reason }, p.by + (p.reason ? ": " + p.reason : "")));
      rep.appendChild(tr);
    });
    if (!r.invoices.length) inv.appendChild(emptyRow(7, "no invoice checked yet"));
    r.invoices.forEach(function (i) {
      var tr = el("tr", { "class": "invoice-row", "data-org": i.org_id, "data-label": i.label });
      tr.appendChild(el("td", { title: i.subscription }, i.org_id));
      tr.appendChild(el("td", { title: i.price }, i.meter || "(" + i.price + ")"));
      tr.appendChild(el("td", null, utc(i.period_end * 1000)));
      tr.appendChild(el("td", null, i.stripe));
      tr.appendChild(el("td", null, i.ledger));
      tr.appendChild(el("td", null, i.pending));
      tr.appendChild(el("td", { "class": "label " + i.label, title: i.detail }, LABEL_TEXT[i.label] || i.label));
      inv.appendChild(tr);
    });
  }

  function emptyRow(span, text) {
    var tr = el("tr");
    tr.appendChild(el("td", { colspan: span, "class": "empty" }, text));
    return tr;
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
    state.data = data;
    hideTip();
    renderGate(data);
    renderChart(data);
    renderDrift(data);
    renderDetail(data);
    renderWorst(data);
    renderHeatmap(data);
    renderReconcile(data);
    renderSide(data);
    document.body.setAttribute("data-rendered", String(data.buckets.length));
  }

  function refresh() {
    fetch("/dashboard/data.json", { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (d) { if (d) render(d); })
      .catch(function () { /* keep the last picture */ });
  }

  var resizeTimer = null;
  window.addEventListener("resize", function () {
    if (resizeTimer) window.clearTimeout(resizeTimer);
    resizeTimer = window.setTimeout(function () { if (state.data) render(state.data); }, 150);
  });
  document.getElementById("bucket-detail-close").addEventListener("click", function () {
    state.selected = null;
    state.org = null;
    render(state.data);
  });

  var initial = document.getElementById("initial-data");
  render(JSON.parse(initial.textContent));
  window.setInterval(refresh, 15000);
})();
