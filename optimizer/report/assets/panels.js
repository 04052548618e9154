  // ----- VRAM bars
  function vramBars() {
    var legend = document.getElementById("vram-legend");
    TERMS.forEach(function (t) { legend.appendChild(el("span", {}, [el("i", { style: "background:" + t[1] }), t[0]])); });
    legend.appendChild(el("span", {}, [el("i", { style: "background:#2d3748" }), "measured peak allocation"]));
    legend.appendChild(el("span", {}, [el("i", { style: "background:#c0392b;width:3px" }), "budget"]));
    document.getElementById("vram-note").textContent = "Per GPU: the upper bar is the VRAM model's prediction by term, the lower bar " +
      "the measured peak allocation (allocator or engine buffers; the CUDA context and other overhead are not part of it, so the " +
      "predicted overhead is drawn after it, lighter). Rejected configurations have no measured bar: they were never loaded.";
    var rows = D.configs.filter(function (c) { return c.pred.length; });
    var max = 0;
    rows.forEach(function (c) {
      c.pred.forEach(function (d) { max = Math.max(max, d.total, d.budget); });
      c.meas.forEach(function (m) { max = Math.max(max, m.peak + ((c.pred[m.index] || {}).overhead || 0)); });
    });
    if (!rows.length || max <= 0) { document.getElementById("vram-bars").appendChild(el("p", { "class": "note" }, ["No predictions recorded."])); return; }
    var LW = 330, BW = 520, RH = 11, W = LW + BW + 90, y = 6, parts = [];
    rows.forEach(function (c) { parts.push(c); });
    var H = 8 + rows.reduce(function (s, c) { return s + c.pred.length * (2 * RH + 6) + 8; }, 0);
    var svg = sv("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, id: "vram-svg" });
    function X(b) { return LW + b / max * BW; }
    parts.forEach(function (c) {
      var g = sv("g", { "class": "vram-row", "data-key": c.key });
      c.pred.forEach(function (d, gi) {
        var label = (gi === 0 ? c.label + " " + c.cache + " " + c.ctx + " " + c.split + "  " : "") + "GPU " + d.index;
        g.appendChild(sv("text", { x: LW - 8, y: y + RH + 3, "text-anchor": "end", "font-size": 10.5,
          fill: c.status === "infeasible" ? "#a33" : "#1d2330" }, label));
        var x = X(0);
        TERMS.forEach(function (t) {
          var w = (d[t[0]] || 0) / max * BW;
          if (w > 0) { g.appendChild(sv("rect", { x: x, y: y, width: w, height: RH, fill: t[1] }, undefined)); }
          x += w;
        });
        g.appendChild(sv("text", { x: X(Math.max(d.total, d.budget)) + 4, y: y + RH - 1, "font-size": 9.5, fill: "#5b6475" },
          "pred " + gib(d.total).toFixed(3)));
        var m = c.meas.filter(function (mm) { return mm.index === d.index; })[0];
        if (m) {
          g.appendChild(sv("rect", { x: X(0), y: y + RH + 2, width: m.peak / max * BW, height: RH, fill: "#2d3748" }));
          g.appendChild(sv("rect", { x: X(m.peak), y: y + RH + 2, width: d.overhead / max * BW, height: RH, fill: "#9a9a9a", "fill-opacity": 0.45 }));
          g.appendChild(sv("text", { x: X(Math.max(m.peak + d.overhead, d.budget)) + 4, y: y + 2 * RH + 1, "font-size": 9.5, fill: "#5b6475" },
            "meas " + gib(m.peak + d.overhead).toFixed(3)));
        }
        g.appendChild(sv("line", { x1: X(d.budget), x2: X(d.budget), y1: y - 2, y2: y + 2 * RH + 4, stroke: "#c0392b", "stroke-width": 1.5 }));
        y += 2 * RH + 6;
      });
      g.addEventListener("mouseenter", function (e) { showTip(e, c); });
      g.addEventListener("mousemove", moveTip);
      g.addEventListener("mouseleave", hideTip);
      svg.appendChild(g);
      y += 8;
    });
    document.getElementById("vram-bars").appendChild(svg);
  }

  // ----- predicted against measured: one scatter per quantity, the diagonal is a perfect prediction
  function scatterPanel(host, id, pts, xLabel, yLabel, digits) {
    var W = 400, H = 330, L = 62, R = 14, T = 12, B = 44;
    var all = [];
    pts.forEach(function (p) { all.push(p.x, p.y); if (p.xlo !== null) { all.push(p.xlo); } if (p.xhi !== null) { all.push(p.xhi); } });
    var lo = Math.min.apply(null, all), hi = Math.max.apply(null, all);
    var pad = (hi - lo) * 0.08 || Math.abs(hi) * 0.05 || 0.01;
    lo = Math.max(0, lo - pad); hi += pad;
    function X(v) { return L + (v - lo) / (hi - lo) * (W - L - R); }
    function Y(v) { return T + (hi - v) / (hi - lo) * (H - T - B); }
    var svg = sv("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, id: id });
    svg.appendChild(sv("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "none", stroke: "#9aa1ad" }));
    svg.appendChild(sv("line", { x1: X(lo), y1: Y(lo), x2: X(hi), y2: Y(hi), stroke: "#c0392b", "stroke-dasharray": "4 3" }));
    [0, 0.25, 0.5, 0.75, 1].forEach(function (f) {
      var v = lo + f * (hi - lo);
      svg.appendChild(sv("text", { x: X(v), y: H - B + 15, "text-anchor": "middle", "font-size": 10.5, fill: "#5b6475" }, v.toFixed(digits)));
      svg.appendChild(sv("text", { x: L - 5, y: Y(v) + 4, "text-anchor": "end", "font-size": 10.5, fill: "#5b6475" }, v.toFixed(digits)));
    });
    svg.appendChild(sv("text", { x: (L + W - R) / 2, y: H - 10, "text-anchor": "middle", "font-size": 11.5 }, xLabel));
    svg.appendChild(sv("text", { x: 13, y: (T + H - B) / 2, "text-anchor": "middle", "font-size": 11.5,
      transform: "rotate(-90 13 " + (T + H - B) / 2 + ")" }, yLabel));
    pts.forEach(function (p) {
      if (p.xlo !== null && p.xhi !== null) {
        svg.appendChild(sv("line", { x1: X(p.xlo), x2: X(p.xhi), y1: Y(p.y), y2: Y(p.y), stroke: "#9aa1ad" }));
      }
      var dot = sv("circle", { "class": "pvm-pt", cx: X(p.x), cy: Y(p.y), r: 4, fill: ctxColour(p.c.ctx), "fill-opacity": 0.85, "data-key": p.c.key });
      dot.addEventListener("mouseenter", function (e) { showTip(e, p.c); });
      dot.addEventListener("mousemove", moveTip);
      dot.addEventListener("mouseleave", hideTip);
      svg.appendChild(dot);
    });
    host.appendChild(svg);
  }

  function predictedPanels() {
    var host = document.getElementById("pvm"), row = el("div", { "class": "panels" });
    D.panels.forEach(function (p) { host.appendChild(el("p", {}, [p])); });
    var vram = [], ppl = [], gen = [];
    D.configs.forEach(function (c) {
      c.meas.forEach(function (m) {
        var d = c.pred.filter(function (p) { return p.index === m.index; })[0];
        if (d) { vram.push({ c: c, x: gib(d.total - d.overhead), y: gib(m.peak), xlo: null, xhi: null }); }
      });
      if (c.status !== "measured") { return; }
      if (c.ppl !== null && c.pred_ppl !== null) { ppl.push({ c: c, x: c.pred_ppl, y: c.ppl, xlo: c.pred_ppl_low, xhi: c.pred_ppl_high }); }
      if (c.gen !== null && c.pred_gen !== null) { gen.push({ c: c, x: c.pred_gen, y: c.gen, xlo: c.pred_gen_low, xhi: c.pred_gen_high }); }
    });
    if (vram.length) { scatterPanel(row, "pvm-svg", vram, "predicted GiB (without overhead)", "measured peak GiB", 3); }
    if (ppl.length) { scatterPanel(row, "pvm-ppl", ppl, "predicted perplexity (bar: interval)", "measured perplexity", 2); }
    if (gen.length) { scatterPanel(row, "pvm-gen", gen, "predicted generation tok/s (bar: interval)", "measured tok/s", 1); }
    if (!vram.length && !ppl.length && !gen.length) {
      host.appendChild(el("p", { "class": "note" }, ["Nothing measured yet: no comparison."]));
    }
    host.appendChild(row);
  }
