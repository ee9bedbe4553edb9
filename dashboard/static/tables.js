// Fedsite dashboard: DOM helpers, number formats and the tables. Every value from the server is
// put into the page as text (textContent), never as HTML: client metrics come from devices.
"use strict";

const Fed = (() => {
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("data-")) node.setAttribute(key, String(value));
      else if (key === "title") node.title = String(value);
      else if (key === "onclick") node.addEventListener("click", value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  function isNum(v) { return typeof v === "number" && Number.isFinite(v); }

  function num(v, digits = 3) {
    if (!isNum(v)) return v === null || v === undefined ? "–" : String(v);
    if (Number.isInteger(v) && Math.abs(v) < 1e6) return String(v);
    if (v !== 0 && Math.abs(v) < 1e-3) return v.toExponential(2);
    return v.toFixed(digits);
  }

  function bytes(v) {
    if (!isNum(v)) return "–";
    if (v < 1024) return `${v} B`;
    const units = ["KB", "MB", "GB", "TB"];
    let x = v, i = -1;
    do { x /= 1000; i++; } while (x >= 1000 && i < units.length - 1);
    return `${x.toFixed(x < 10 ? 2 : 1)} ${units[i]}`;
  }

  function seconds(v) {
    if (!isNum(v)) return "–";
    if (v < 60) return `${v.toFixed(v < 10 ? 1 : 0)} s`;
    const h = Math.floor(v / 3600), m = Math.floor((v % 3600) / 60), s = Math.floor(v % 60);
    return h ? `${h} h ${m} min` : `${m} min ${s} s`;
  }

  // Plotly reads a few HTML tags in names and titles: what came from files is escaped first.
  function esc(v) {
    return String(v).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }

  // columns: [{key, label, format(value, row), cls, sortable}]
  function table(node, columns, rows, opts = {}) {
    clear(node);
    const head = el("tr");
    for (const col of columns) {
      let cls = col.cls || "";
      if (opts.sort && col.sortable !== false) cls += " sortable";
      if (opts.sort && opts.sort.key === col.key) cls += opts.sort.desc ? " sorted-desc" : " sorted-asc";
      const th = el("th", { class: cls.trim(), "data-key": col.key, scope: "col" }, col.label);
      if (opts.sort && col.sortable !== false) th.addEventListener("click", () => opts.onSort(col.key));
      head.append(th);
    }
    node.append(el("thead", {}, head));
    const body = el("tbody");
    for (const row of rows) {
      const tr = el("tr", { class: opts.rowClass ? opts.rowClass(row) : "", ...(opts.rowAttrs ? opts.rowAttrs(row) : {}) });
      for (const col of columns) {
        const value = row[col.key];
        tr.append(el("td", { class: col.cls, "data-key": col.key }, col.format ? col.format(value, row) : num(value)));
      }
      body.append(tr);
    }
    node.append(body);
    if (!rows.length) body.append(el("tr", {}, el("td", { colspan: columns.length, class: "muted text" }, opts.empty || "nothing yet")));
  }

  function keyValues(node, pairs) {
    clear(node);
    const body = el("tbody");
    for (const [key, value] of pairs) body.append(el("tr", {}, el("th", { scope: "row" }, key), el("td", {}, value)));
    node.append(body);
  }

  function facts(node, pairs) {
    clear(node);
    for (const [key, value, id] of pairs) node.append(el("div", { "data-fact": id || key }, el("dt", {}, key), el("dd", {}, value)));
  }

  const roundColumns = [
    { key: "round", label: "round" },
    { key: "eval_accuracy", label: "accuracy" },
    { key: "eval_loss", label: "eval loss" },
    { key: "train_loss", label: "train loss" },
    { key: "sampled", label: "sampled" },
    { key: "contributors", label: "contributors" },
    { key: "rejected", label: "rejected" },
    { key: "dropped", label: "dropped" },
    { key: "stragglers", label: "stragglers" },
    { key: "unavailable", label: "unavailable" },
    { key: "upload_bytes", label: "upload", format: bytes },
    { key: "download_bytes", label: "download", format: bytes },
    { key: "round_seconds", label: "round time", format: seconds },
    { key: "simulated_seconds", label: "simulated time", format: seconds },
    { key: "epsilon", label: "ε (client DP)" },
    { key: "rejections", label: "rejections / halts", cls: "reason", format: (v, row) => [
      ...(v || []).map((r) => `client ${r.client}: ${r.reason}`),
      ...(row.dropped_ids || []).length ? [`dropped: ${row.dropped_ids.join(", ")}`] : [],
      ...(row.secure_halted ? [`secure aggregation halted: ${row.secure_halted}`] : []),
    ].join("; ") },
  ];

  function rounds(node, rows) {
    const shown = roundColumns.filter((c) => c.key === "round" || c.key === "rejections" || rows.some((r) => r[c.key] !== null && r[c.key] !== undefined));
    table(node, shown, rows.slice().reverse(), {
      rowAttrs: (r) => ({ "data-round": r.round }),
      rowClass: (r) => (r.rejected || r.secure_halted ? "rejected" : ""),
      empty: "no round finished yet",
    });
  }

  const clientColumns = [
    { key: "round", label: "round" },
    { key: "client", label: "client", cls: "text" },
    { key: "status", label: "status", cls: "text" },
    { key: "examples", label: "examples" },
    { key: "train_loss", label: "loss" },
    { key: "train_loss_final", label: "final loss" },
    { key: "steps", label: "steps" },
    { key: "seconds", label: "seconds", format: (v) => num(v, 2) },
    { key: "upload_bytes", label: "upload", format: bytes },
    { key: "profile", label: "profile", cls: "text" },
    { key: "package_kind", label: "package", cls: "text" },
    { key: "lora_rank", label: "rank" },
    { key: "quantize", label: "backbone", cls: "text" },
    { key: "upload_codec", label: "codec", cls: "text" },
    { key: "simulated_seconds", label: "simulated s", format: (v) => num(v, 2) },
    { key: "epsilon", label: "ε" },
    { key: "reason", label: "rejection reason", cls: "reason", format: (v) => v || "" },
  ];

  function clients(node, page, sort, onSort) {
    const shown = clientColumns.filter((c) => ["round", "client", "status", "reason"].includes(c.key) || page.rows.some((r) => r[c.key] !== null));
    table(node, shown, page.rows, {
      sort, onSort,
      rowAttrs: (r) => ({ "data-client": r.client, "data-round": r.round }),
      rowClass: (r) => (r.status && r.status !== "accepted" ? "rejected" : ""),
      empty: "no client update recorded yet",
    });
  }

  return { el, clear, isNum, num, bytes, seconds, esc, table, keyValues, facts, rounds, clients };
})();
