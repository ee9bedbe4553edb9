// Fedsite dashboard: the charts, all drawn by plotly.js (shipped in the `plotly` Python package).
// Plotly.react updates a chart in place, so a live run's curves grow without a redraw flicker.
"use strict";

const FedCharts = (() => {
  const config = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["sendDataToCloud", "lasso2d", "select2d"] };

  function layout(title, xTitle, yTitle, extra = {}) {
    return {
      title: { text: title, font: { size: 14 } },
      margin: { l: 55, r: 15, t: 40, b: 40 },
      xaxis: { title: { text: xTitle, standoff: 4 }, zeroline: false },
      yaxis: { title: { text: yTitle }, zeroline: false, ...(extra.yaxis || {}) },
      legend: { orientation: "h", x: 0, y: -0.2, yanchor: "top", font: { size: 11 } },
      hovermode: "closest",
      uirevision: title, // keep the user's zoom across live updates
      ...(extra.layout || {}),
    };
  }

  function draw(id, traces, lay) {
    const node = document.getElementById(id);
    if (!node || typeof Plotly === "undefined") return;
    if (lay.xaxis.title.text === "round") { // whole rounds only, a dozen ticks at most
      const last = Math.max(1, ...traces.flatMap((t) => t.x || []));
      lay.xaxis.dtick = Math.max(1, Math.ceil(last / 12));
    }
    if (!traces.length) {
      lay.annotations = [{ text: "no data yet", showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5, font: { color: "#6b7280" } }];
    }
    Plotly.react(node, traces, lay, config);
  }

  function points(run, key, withInitial) {
    const rows = withInitial && run.initial && Fed.isNum(run.initial[key]) ? [{ round: 0, [key]: run.initial[key] }, ...run.rounds] : run.rounds;
    const xy = rows.filter((r) => Fed.isNum(r[key]));
    return { x: xy.map((r) => r.round), y: xy.map((r) => r[key]) };
  }

  function line(run, i, key, suffix, dash, opts = {}) {
    const p = points(run, key, opts.initial);
    if (!p.x.length) return null;
    const scale = opts.scale || 1;
    return {
      type: "scatter", mode: "lines+markers", name: Fed.esc(run.name) + suffix, x: p.x, y: p.y.map((v) => v * scale),
      line: { dash, color: color(i) }, marker: { size: 6 }, meta: { run: run.id, key },
    };
  }

  function color(i) {
    const palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
    return palette[i % palette.length];
  }

  function curves(runs) {
    const grow = (list) => list.filter(Boolean);
    draw("chart-accuracy", grow(runs.flatMap((r, i) => [line(r, i, "eval_accuracy", "", "solid", { initial: true }), line(r, i, "federated_eval_accuracy", " (federated)", "dot")])),
      layout("held-out exact match", "round", "accuracy", { yaxis: { range: [-0.02, 1.02] } }));
    draw("chart-loss", grow(runs.flatMap((r, i) => [line(r, i, "eval_loss", " eval", "solid", { initial: true }), line(r, i, "train_loss", " train", "dash")])),
      layout("loss (eval solid, train dashed)", "round", "loss"));
    draw("chart-bytes", grow(runs.flatMap((r, i) => [line(r, i, "upload_bytes", " upload", "solid", { scale: 1e-6 }), line(r, i, "download_bytes", " download", "dash", { scale: 1e-6 })])),
      layout("bytes per round (upload solid, download dashed)", "round", "MB", { yaxis: { rangemode: "tozero" } }));
    draw("chart-participation", participation(runs), layout("participation", "round", "clients", { yaxis: { rangemode: "tozero" }, layout: { barmode: "group" } }));
    const time = timeToAccuracy(runs);
    draw("chart-time", time.traces, layout("time to accuracy", `cumulative ${time.basis} seconds`, "held-out exact match", { yaxis: { range: [-0.02, 1.02] } }));
  }

  function participation(runs) {
    const keys = ["sampled", "contributors", "rejected", "dropped", "stragglers", "unavailable"];
    if (runs.length === 1) { // one run: grouped bars per round
      const run = runs[0];
      return keys.filter((k) => run.rounds.some((r) => Fed.isNum(r[k]))).map((k, j) => ({
        type: "bar", name: k, x: run.rounds.map((r) => r.round), y: run.rounds.map((r) => r[k]), marker: { color: color(j) }, meta: { run: run.id, key: k },
      }));
    }
    return runs.flatMap((r, i) => [line(r, i, "contributors", " contributors", "solid"), line(r, i, "rejected", " rejected", "dot")]).filter(Boolean);
  }

  function timeToAccuracy(runs) {
    const bases = new Set();
    const traces = [];
    runs.forEach((run, i) => {
      const key = run.rounds.some((r) => Fed.isNum(r.simulated_seconds)) ? "simulated_seconds" : run.rounds.some((r) => Fed.isNum(r.round_seconds)) ? "round_seconds" : null;
      if (!key) return;
      bases.add(key === "simulated_seconds" ? "simulated" : "wall-clock");
      let t = 0;
      const x = [], y = [];
      if (run.initial && Fed.isNum(run.initial.eval_accuracy)) { x.push(0); y.push(run.initial.eval_accuracy); }
      for (const r of run.rounds) {
        t += Fed.isNum(r[key]) ? r[key] : 0;
        if (Fed.isNum(r.eval_accuracy)) { x.push(t); y.push(r.eval_accuracy); }
      }
      if (x.length) traces.push({ type: "scatter", mode: "lines+markers", name: Fed.esc(run.name) + (key === "simulated_seconds" ? " (simulated)" : ""), x, y, line: { color: color(i) }, meta: { run: run.id } });
    });
    return { traces, basis: bases.size === 1 ? [...bases][0] : bases.size ? "simulated or wall-clock" : "" };
  }

  function overview(run) {
    const traces = [line(run, 0, "eval_accuracy", " accuracy", "solid", { initial: true }), line(run, 1, "eval_loss", " eval loss", "solid", { initial: true })].filter(Boolean);
    if (traces[1]) traces[1].yaxis = "y2";
    draw("chart-overview", traces, layout("accuracy and loss", "round", "accuracy", {
      yaxis: { range: [-0.02, 1.02] },
      layout: { yaxis2: { title: { text: "loss" }, overlaying: "y", side: "right", zeroline: false }, margin: { l: 55, r: 55, t: 40, b: 40 } },
    }));
  }

  function privacy(data) {
    const traces = Object.entries(data.traces).map(([client, pts], i) => ({
      type: "scatter", mode: "lines+markers", name: `client ${Fed.esc(client)}`, x: pts.map((p) => p[0]), y: pts.map((p) => p[1]),
      line: { width: 1, color: color(i) }, marker: { size: 4 }, opacity: 0.75, meta: { client },
      showlegend: Object.keys(data.traces).length <= 12, // many clients: names on hover, not in the legend
    }));
    if (data.clients > Object.keys(data.traces).length && data.spread.length) { // the clients not drawn one by one
      traces.push({ type: "scatter", mode: "lines", name: `median of the ${data.clients} clients that trained`, x: data.spread.map((p) => p.round),
        y: data.spread.map((p) => p.median), line: { width: 2, dash: "dot", color: "#6b7280" }, meta: { key: "median" } });
    }
    if (data.run_series.length) {
      traces.push({ type: "scatter", mode: "lines", name: `run-level ε (${data.run_epsilon_basis})`, x: data.run_series.map((p) => p[0]), y: data.run_series.map((p) => p[1]),
        line: { width: 3, color: "#111827" }, meta: { key: "run" } });
    }
    if (Fed.isNum(data.budget) && data.run_series.length) {
      const xs = data.run_series.map((p) => p[0]);
      traces.push({ type: "scatter", mode: "lines", name: `budget ε = ${data.budget}`, x: [Math.min(...xs), Math.max(...xs)], y: [data.budget, data.budget],
        line: { dash: "dash", width: 2, color: "#b91c1c" }, meta: { key: "budget" } });
    }
    const more = data.clients > Object.keys(data.traces).length ? ` (the ${Object.keys(data.traces).length} highest of ${data.clients} clients)` : "";
    draw("chart-privacy", traces, layout(`epsilon spent per client over rounds${more}`, "round", `ε (δ = ${data.delta ?? "–"})`, { yaxis: { rangemode: "tozero" } }));
  }

  function offsite(data) {
    const run = { id: "offsite", name: "", rounds: data.rounds, initial: data.initial };
    const traces = [
      line(run, 0, "eval_accuracy", "LoRA track (full backbone)", "solid", { initial: true }),
      line(run, 1, "offsite_eval_accuracy", "plug-in (backbone + offsite adapter)", "solid", { initial: true }),
      line(run, 2, "emulator_eval_accuracy", "emulator itself", "dot", { initial: true }),
      line(run, 0, "eval_loss", "LoRA track loss", "dash", { initial: true }),
      line(run, 1, "offsite_eval_loss", "plug-in loss", "dash", { initial: true }),
      line(run, 2, "emulator_eval_loss", "emulator loss", "dash", { initial: true }),
    ];
    traces.slice(3).forEach((t) => { if (t) t.yaxis = "y2"; });
    draw("chart-offsite", traces.filter(Boolean), layout("offsite track: accuracy (solid) and loss (dashed)", "round", "accuracy", {
      yaxis: { range: [-0.02, 1.02] },
      layout: { yaxis2: { title: { text: "loss" }, overlaying: "y", side: "right", zeroline: false }, margin: { l: 55, r: 55, t: 40, b: 40 } },
    }));
  }

  return { curves, overview, privacy, offsite };
})();
