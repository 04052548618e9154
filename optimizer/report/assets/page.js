  var D = JSON.parse(document.getElementById("report-data").textContent);
  var SVGNS = "http://www.w3.org/2000/svg";
  var byKey = {};
  D.configs.forEach(function (c) { byKey[c.key] = c; });
  var GIB = 1073741824;
  var VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"];
  var TERMS = [["weights", "#4c72b0"], ["cache", "#dd8452"], ["staging", "#f0b27a"], ["scratch", "#55a868"],
               ["transient", "#8172b3"], ["overhead", "#9a9a9a"]];
  var STATUS_TEXT = { measured: "measured", predicted: "predicted", infeasible: "rejected (VRAM model)", failed: "failed",
                      reused: "reused", outside_space: "outside the space", running: "running",
                      skipped: "skipped (predicted dominated)" };

  function el(tag, attrs, kids) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    (kids || []).forEach(function (k) { e.appendChild(typeof k === "string" ? document.createTextNode(k) : k); });
    return e;
  }
  function sv(tag, attrs, text) {
    var e = document.createElementNS(SVGNS, tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function fmt(x, d) { return (x === null || x === undefined || x === "") ? "" : Number(x).toFixed(d); }
  function gib(b) { return b / GIB; }
  function mix(a, b, t) {
    var pa = parseInt(a.slice(1), 16), pb = parseInt(b.slice(1), 16), out = "#";
    [16, 8, 0].forEach(function (s) {
      var v = Math.round(((pa >> s) & 255) * (1 - t) + ((pb >> s) & 255) * t);
      out += (v < 16 ? "0" : "") + v.toString(16);
    });
    return out;
  }
  function ctxColour(ctx) {
    var lo = D.ctx_range[0], hi = D.ctx_range[1];
    var t = (lo > 0 && hi > lo) ? (Math.log(ctx) - Math.log(lo)) / (Math.log(hi) - Math.log(lo)) : 0.5;
    t = Math.max(0, Math.min(1, t)) * (VIRIDIS.length - 1);
    var i = Math.min(Math.floor(t), VIRIDIS.length - 2);
    return mix(VIRIDIS[i], VIRIDIS[i + 1], t - i);
  }
  function describe(c) {
    return c.label + " (" + c.format + "), cache " + c.cache + ", ctx " + c.ctx + ", split " + c.split;
  }
  function speedText(c) {
    if (c.gen === null || c.gen === undefined) { return ""; }
    var s = fmt(c.gen, 1);
    if (c.runs && c.runs.length > 1) { s += " [" + fmt(c.gen_min, 1) + "\u2013" + fmt(c.gen_max, 1) + "]"; }
    return s;
  }

  // ----- tooltip
  var tip = document.getElementById("tooltip");
  function showTip(evt, c) {
    while (tip.firstChild) { tip.removeChild(tip.firstChild); }
    tip.appendChild(el("div", {}, [el("b", {}, [describe(c)])]));
    tip.appendChild(el("div", {}, [c.variant]));
    if (c.reason) { tip.appendChild(el("div", {}, [STATUS_TEXT[c.status] || c.status, ": ", c.reason])); }
    tip.appendChild(el("div", {}, ["perplexity " + fmt(c.ppl, 3) + ", generation " + speedText(c) + " tok/s" +
      (c.runs && c.runs.length ? " (median of " + c.runs.length + " runs)" : "") + ", prompt " + fmt(c.prompt, 0) + " tok/s"]));
    tip.appendChild(el("div", {}, ["VRAM predicted " + c.pred_gib + " GiB, measured " + (c.meas_gib || "\u2013") + " GiB"]));
    if (c.pred_ppl !== null || c.pred_gen !== null) {
      tip.appendChild(el("div", {}, ["predicted: ppl " + fmt(c.pred_ppl, 3) + " [" + fmt(c.pred_ppl_low, 3) + "\u2013" +
        fmt(c.pred_ppl_high, 3) + "], " + fmt(c.pred_gen, 1) + " tok/s [" + fmt(c.pred_gen_low, 1) + "\u2013" + fmt(c.pred_gen_high, 1) + "]"]));
    }
    if (c.noise_of) { tip.appendChild(el("div", { "class": "noise" }, ["within the speed noise of " + c.noise_of])); }
    if (c.download) { tip.appendChild(el("div", {}, ["get it: ", el("code", {}, [c.download])])); }
    if (c.run) { tip.appendChild(el("div", {}, ["run it: ", el("code", {}, [c.run])])); }
    tip.hidden = false;
    moveTip(evt);
  }
  function moveTip(evt) {
    var x = evt.clientX + 14, y = evt.clientY + 14;
    if (x + tip.offsetWidth > window.innerWidth) { x = evt.clientX - tip.offsetWidth - 14; }
    if (y + tip.offsetHeight > window.innerHeight) { y = evt.clientY - tip.offsetHeight - 14; }
    tip.style.left = Math.max(0, x) + "px";
    tip.style.top = Math.max(0, y) + "px";
  }
  function hideTip() { tip.hidden = true; }
  function highlight(key) {
    Array.prototype.forEach.call(document.querySelectorAll("tr.hl"), function (r) { r.classList.remove("hl"); });
    Array.prototype.forEach.call(document.querySelectorAll("tr[data-key]"), function (r) {
      if (r.getAttribute("data-key") === key) { r.classList.add("hl"); }
    });
  }

  // ----- header and recommendation
  document.getElementById("title").textContent = D.title;
  var n = D.counts;
  document.getElementById("summary").textContent = "Study " + D.study + ": " + n.configurations + " configurations \u2014 " +
    n.measured + " measured, " + n.infeasible + " rejected by the VRAM model, " + n.failed + " failed" +
    (n.predicted ? ", " + n.predicted + " predicted" : "") +
    (n.skipped ? ", " + n.skipped + " skipped (predicted dominated, not measured)" : "") + "; " + D.front.length + " on the Pareto front. Budget " +
    D.budget_text + ", split " + D.split + ". Generated " + D.generated + ".";
  var reco = document.getElementById("recommendation");
  if (!D.picks.length) { reco.appendChild(el("p", {}, [D.recommendation])); }
  D.picks.forEach(function (p) {
    var c = byKey[p[1]];
    var row = el("div", { "class": "reco", "data-pick": p[0] }, [el("b", {}, [p[0] + ":"]),
      describe(c) + ": ppl " + fmt(c.ppl, 3) + ", " + speedText(c) + " tok/s"]);
    if (c.noise_of) { row.appendChild(el("span", { "class": "noise" }, [" \u2248 within the speed noise of " + c.noise_of])); }
    reco.appendChild(row);
    if (c.download && p[0] === "balanced") { reco.appendChild(el("div", { "class": "reco" }, [el("b", {}, ["get it:"]), el("code", {}, [c.download])])); }
    if (c.run && p[0] === "balanced") { reco.appendChild(el("div", { "class": "reco" }, [el("b", {}, ["run it:"]), el("code", {}, [c.run])])); }
  });

  // ----- the front chart
  function frontChart() {
    var host = document.getElementById("front-chart");
    var pts = D.configs.filter(function (c) { return c.status === "measured" && c.feasible; });
    if (!pts.length) { host.appendChild(el("p", { "class": "note" }, ["No measured configuration within the budget."])); return; }
    pts.sort(function (a, b) { return a.ctx - b.ctx; });
    var W = 900, H = 460, L = 64, R = 150, T = 16, B = 48;
    var svg = sv("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img", "aria-label": "Pareto front" });
    var xs = [], ys = [];
    pts.forEach(function (c) { xs.push(c.gen_min !== null ? c.gen_min : c.gen, c.gen_max !== null ? c.gen_max : c.gen); ys.push(c.ppl); });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs), y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    var px = (x1 - x0) * 0.08 || Math.abs(x1) * 0.1 || 1, py = (y1 - y0) * 0.08 || Math.abs(y1) * 0.05 || 1;
    x0 -= px; x1 += px; y0 -= py; y1 += py;
    function X(v) { return L + (v - x0) / (x1 - x0) * (W - L - R); }
    function Y(v) { return T + (y1 - v) / (y1 - y0) * (H - T - B); }
    function ticks(a, b, k) {
      var step = Math.pow(10, Math.floor(Math.log(((b - a) / k)) / Math.LN10)), out = [];
      [1, 2, 5, 10].some(function (m) { if ((b - a) / (step * m) <= k) { step *= m; return true; } return false; });
      for (var v = Math.ceil(a / step) * step; v <= b; v += step) { out.push(v); }
      return { v: out, d: Math.max(0, -Math.floor(Math.log(step) / Math.LN10)) };
    }
    var tx = ticks(x0, x1, 8), ty = ticks(y0, y1, 6);
    tx.v.forEach(function (v) {
      svg.appendChild(sv("line", { x1: X(v), x2: X(v), y1: T, y2: H - B, stroke: "#e6e8ee" }));
      svg.appendChild(sv("text", { x: X(v), y: H - B + 16, "text-anchor": "middle", "font-size": 11, fill: "#5b6475" }, v.toFixed(tx.d)));
    });
    ty.v.forEach(function (v) {
      svg.appendChild(sv("line", { x1: L, x2: W - R, y1: Y(v), y2: Y(v), stroke: "#e6e8ee" }));
      svg.appendChild(sv("text", { x: L - 6, y: Y(v) + 4, "text-anchor": "end", "font-size": 11, fill: "#5b6475" }, v.toFixed(ty.d)));
    });
    svg.appendChild(sv("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "none", stroke: "#9aa1ad" }));
    svg.appendChild(sv("text", { x: (L + W - R) / 2, y: H - 10, "text-anchor": "middle", "font-size": 12 }, "generation tokens/s (higher is better)"));
    svg.appendChild(sv("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle", "font-size": 12,
      transform: "rotate(-90 14 " + (T + H - B) / 2 + ")" }, "perplexity (lower is better)"));
    pts.forEach(function (c) {
      if (c.runs && c.runs.length > 1) {
        svg.appendChild(sv("line", { x1: X(c.gen_min), x2: X(c.gen_max), y1: Y(c.ppl), y2: Y(c.ppl), stroke: "#9aa1ad", "stroke-width": 1.2 }));
      }
    });
    pts.forEach(function (c) {
      var g = sv("g", { "class": "pt", "data-key": c.key });
      g.appendChild(sv("circle", { cx: X(c.gen), cy: Y(c.ppl), r: 5, fill: ctxColour(c.ctx), "fill-opacity": 0.85 }));
      if (c.front) {
        g.appendChild(sv("circle", { "class": "front-ring", cx: X(c.gen), cy: Y(c.ppl), r: 9, fill: "none",
          stroke: c.noise_of ? "#d69e2e" : "#c0392b", "stroke-width": 1.8, "stroke-dasharray": c.noise_of ? "3 2" : "" }));
      }
      g.addEventListener("mouseenter", function (e) { showTip(e, c); highlight(c.key); });
      g.addEventListener("mousemove", moveTip);
      g.addEventListener("mouseleave", hideTip);
      svg.appendChild(g);
    });
    // labels of front points, inside the plot area, moved off each other (above, below, then further out)
    var placed = [];
    D.front.forEach(function (k) {
      var c = byKey[k], x = X(c.gen), right = x > (L + W - R) / 2;
      var text = c.label + " " + c.cache + " " + c.ctx + (c.noise_of ? " \u2248" : ""), w = text.length * 6 + 4;
      var x0 = right ? x - 11 - w : x + 11, y = Y(c.ppl) - 6;
      [-6, 14, -20, 28, -34, 42].some(function (dy) {
        y = Math.max(T + 11, Math.min(H - B - 3, Y(c.ppl) + dy));
        return !placed.some(function (b) { return x0 < b[0] + b[2] && b[0] < x0 + w && y - 11 < b[1] && b[1] - 11 < y; });
      });
      placed.push([x0, y, w]);
      svg.appendChild(sv("text", { "class": "front-label", x: right ? x - 11 : x + 11, y: y, "text-anchor": right ? "end" : "start",
        "font-size": 10.5, fill: "#1d2330" }, text));
    });
    // colour bar: the same log scale of contexts as pareto.png
    var cbx = W - R + 34, cbh = H - T - B, lo = D.ctx_range[0], hi = D.ctx_range[1];
    var grad = sv("linearGradient", { id: "ctxgrad", x1: 0, y1: 1, x2: 0, y2: 0 });
    VIRIDIS.forEach(function (col, i) { grad.appendChild(sv("stop", { offset: (i / (VIRIDIS.length - 1)).toFixed(3), "stop-color": col })); });
    var defs = sv("defs"); defs.appendChild(grad); svg.appendChild(defs);
    svg.appendChild(sv("rect", { x: cbx, y: T, width: 14, height: cbh, fill: "url(#ctxgrad)" }));
    var seen = {};
    pts.forEach(function (c) { seen[c.ctx] = true; });
    Object.keys(seen).map(Number).forEach(function (ctx) {
      var t = (lo > 0 && hi > lo) ? (Math.log(ctx) - Math.log(lo)) / (Math.log(hi) - Math.log(lo)) : 0.5;
      var y = T + (1 - t) * cbh;
      svg.appendChild(sv("line", { x1: cbx + 14, x2: cbx + 18, y1: y, y2: y, stroke: "#1d2330" }));
      svg.appendChild(sv("text", { x: cbx + 21, y: y + 4, "font-size": 10.5 }, String(ctx)));
    });
    svg.appendChild(sv("text", { x: cbx + 7, y: H - B + 16, "text-anchor": "middle", "font-size": 11 }, "context"));
    host.appendChild(svg);
  }

  // ----- tables
  function cell(v, cls) { return el("td", cls ? { "class": cls } : {}, [v === null || v === undefined ? "" : String(v)]); }
  function fillTable(id, cols, rows) {
    var t = document.getElementById(id), head = t.tHead, body = t.tBodies[0];
    var hr = el("tr");
    cols.forEach(function (c) { hr.appendChild(el("th", { "data-type": c.num ? "num" : "text", title: c.title || "" }, [c.name])); });
    head.appendChild(hr);
    rows.forEach(function (r) {
      var tr = el("tr", { "data-key": r.key, "data-status": r.status });
      cols.forEach(function (c) {
        var v = c.get(r), td;
        if (v instanceof Node) { td = el("td", {}, [v]); } else { td = cell(v, c.num ? "num" : ""); }
        if (c.sort) { td.setAttribute("data-sort", c.sort(r)); }
        tr.appendChild(td);
      });
      tr.addEventListener("mouseenter", function () { highlight(r.key); });
      body.appendChild(tr);
    });
  }
  function badge(c) { return el("span", { "class": "badge st-" + c.status }, [STATUS_TEXT[c.status] || c.status]); }
  function num(v) { return (v === null || v === undefined || v === "") ? "" : v; }
  var frontCols = [
    { name: "#", num: true, get: function (c) { return c.front; } },
    { name: "label", get: function (c) { return c.label; } },
    { name: "format", get: function (c) { return c.format; } },
    { name: "cache", get: function (c) { return c.cache; } },
    { name: "context", num: true, get: function (c) { return c.ctx; } },
    { name: "split", get: function (c) { return c.split; } },
    { name: "perplexity", num: true, get: function (c) { return fmt(c.ppl, 3); } },
    { name: "gen tok/s [min\u2013max]", num: true, get: speedText },
    { name: "prompt tok/s", num: true, get: function (c) { return fmt(c.prompt, 0); } },
    { name: "VRAM pred / meas GiB", num: true, get: function (c) { return c.pred_gib + " / " + (c.meas_gib || "\u2013"); } },
    { name: "noise", get: function (c) { return c.noise_of ? "\u2248 " + c.noise_of : ""; } },
    { name: "download", get: function (c) { return c.download ? el("code", {}, [c.download]) : ""; } }
  ];
  fillTable("front-table", frontCols, D.front.map(function (k) { return byKey[k]; }));
  var cfgCols = [
    { name: "trial", num: true, get: function (c) { return c.trial; } },
    { name: "status", get: badge, sort: function (c) { return c.status; } },
    { name: "label", get: function (c) { return c.label; } },
    { name: "format", get: function (c) { return c.format; } },
    { name: "bpw", num: true, get: function (c) { return num(c.bpw); } },
    { name: "cache", get: function (c) { return c.cache; } },
    { name: "context", num: true, get: function (c) { return c.ctx; } },
    { name: "split", get: function (c) { return c.split; } },
    { name: "perplexity", num: true, get: function (c) { return fmt(c.ppl, 3); } },
    { name: "gen tok/s [min\u2013max]", num: true, title: "median of the timed runs [slowest\u2013fastest] (tokens/s)",
      get: speedText, sort: function (c) { return c.gen === null ? "" : c.gen; } },
    { name: "prompt tok/s", num: true, get: function (c) { return fmt(c.prompt, 0); } },
    { name: "pred GiB", num: true, get: function (c) { return c.pred_gib; } },
    { name: "meas GiB", num: true, get: function (c) { return c.meas_gib; } },
    { name: "front", get: function (c) { return c.front ? (c.noise_of ? "\u2248 " + c.front : String(c.front)) : ""; } },
    { name: "reason", get: function (c) { return [c.reason, c.binding].filter(Boolean).join("; "); } }
  ];
  fillTable("configs", cfgCols, D.configs);

  function makeSortable(t) {
    var ths = t.tHead.rows[0].cells;
    Array.prototype.forEach.call(ths, function (th, i) {
      th.addEventListener("click", function () {
        var asc = th.getAttribute("aria-sort") !== "ascending", isNum = th.getAttribute("data-type") === "num";
        Array.prototype.forEach.call(ths, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        var body = t.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        function key(r) {
          var c = r.cells[i], s = c.hasAttribute("data-sort") ? c.getAttribute("data-sort") : c.textContent;
          if (!isNum) { return s; }
          var v = parseFloat(s);
          return isNaN(v) ? null : v;
        }
        rows.sort(function (a, b) {
          var ka = key(a), kb = key(b);
          if (ka === null || ka === "") { return (kb === null || kb === "") ? 0 : 1; }
          if (kb === null || kb === "") { return -1; }
          var d = isNum ? ka - kb : String(ka).localeCompare(String(kb), undefined, { numeric: true });
          return asc ? d : -d;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  }
  makeSortable(document.getElementById("configs"));
  var sel = document.getElementById("status-filter"), statuses = {};
  D.configs.forEach(function (c) { statuses[c.status] = (statuses[c.status] || 0) + 1; });
  Object.keys(statuses).sort().forEach(function (s) {
    sel.appendChild(el("option", { value: s }, [(STATUS_TEXT[s] || s) + " (" + statuses[s] + ")"]));
  });
  function applyFilter() {
    var v = sel.value, shown = 0;
    Array.prototype.forEach.call(document.getElementById("configs").tBodies[0].rows, function (r) {
      var on = !v || r.getAttribute("data-status") === v;
      r.hidden = !on; shown += on ? 1 : 0;
    });
    document.getElementById("filter-count").textContent = shown + " of " + D.configs.length + " shown";
  }
  sel.addEventListener("change", applyFilter);
  applyFilter();

  // ----- protocol and noise
  (function () {
    var host = document.getElementById("protocol");
    D.protocol.forEach(function (line) { host.appendChild(el("p", {}, [line])); });
    var marked = D.front.filter(function (k) { return byKey[k].noise_of; });
    if (marked.length) {
      var ul = el("ul");
      marked.forEach(function (k) { var c = byKey[k]; ul.appendChild(el("li", {}, [c.label + " " + c.cache + " " + c.ctx + " \u2248 " + c.noise_of])); });
      host.appendChild(el("p", {}, ["Front points within the noise (their advantage is a speed difference the timed runs do not resolve):"]));
      host.appendChild(ul);
    }
  })();

  frontChart();
  vramBars();
  predictedPanels();
  document.body.setAttribute("data-rendered", "1");
