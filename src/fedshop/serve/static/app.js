// The shopping guide's page: a shopper view (a known customer's recommendations from the server, or
// an anonymous basket folded in here, in the browser: see foldin.js) and an operator view (the runs
// in a folder, their curves, per-storefront metrics, privacy, data, cold start and insight).
// Everything is built with DOM calls and textContent: names from the data are never parsed as HTML.
"use strict";

(function () {
  const K = 10;
  const state = {
    model: null, // Promise of the BrowserModel
    silo: null,
    basket: [], // item ids, in the order added; they stay in this page
    mode: null, // "customer" | "basket"
    searchTimer: null,
    searchSerial: 0,
  };
  const $ = (id) => document.getElementById(id);

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  async function getJson(url) {
    const response = await fetch(url);
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      const message = body && body.error ? body.error.message : "HTTP " + response.status;
      throw new Error(message);
    }
    return body;
  }

  // A number for a table: `digits` decimals when given, else integers as they are and 3 decimals.
  function fmt(value, digits) {
    if (value === null || value === undefined) return "–";
    if (typeof value !== "number") return String(value);
    if (!Number.isFinite(value)) return value > 0 ? "∞" : "–";
    if (digits === undefined && Number.isInteger(value)) return value.toLocaleString("en");
    return value.toFixed(digits === undefined ? 3 : digits);
  }

  function price(value) {
    return value === null || value === undefined ? "" : value.toFixed(2);
  }

  function kilobytes(bytes) {
    return bytes >= 1 << 20 ? (bytes / (1 << 20)).toFixed(1) + " MB" : Math.round(bytes / 1024) + " KB";
  }

  // ---- shopper view ------------------------------------------------------------------------------

  async function loadStorefronts() {
    const { silos } = await getJson("/silos");
    const select = $("storefront");
    select.replaceChildren(...silos.map((s) => el("option", { value: s.name, text: s.name })));
    state.silo = silos.length ? silos[0].name : null;
    select.addEventListener("change", () => {
      state.silo = select.value;
      loadCustomers();
      if (state.mode === "basket") recommendBasket();
      else clearRecommendations();
    });
    await loadCustomers();
  }

  async function loadCustomers() {
    const select = $("customer");
    select.replaceChildren(el("option", { value: "", text: "choose a customer…" }));
    if (!state.silo) return;
    const silo = state.silo;
    const { customers } = await getJson("/customers?silo=" + encodeURIComponent(silo) + "&limit=50");
    if (silo !== state.silo) return;
    select.append(...customers.map((id) => el("option", { value: id, text: id })));
  }

  async function recommendCustomer(customer) {
    state.mode = "customer";
    $("recommendations-title").textContent = "Recommendations for customer " + customer;
    $("recommendations-note").textContent = "Loading…";
    try {
      const answer = await getJson("/recommend?customer=" + encodeURIComponent(customer) + "&k=" + K);
      if (state.mode !== "customer" || $("customer").value !== customer) return;
      $("recommendations-note").textContent =
        "From the server, with customer " + answer.customer + "'s own vector at " + answer.silo + ".";
      renderRecommendations(answer.items, "customer");
    } catch (error) {
      $("recommendations-note").textContent = "No recommendations: " + error.message;
      $("recommendations").replaceChildren();
    }
  }

  function clearRecommendations() {
    state.mode = null;
    $("customer").value = "";
    $("recommendations-title").textContent = "Recommendations";
    $("recommendations-note").textContent = "Choose a customer, or add items to a basket.";
    $("recommendations").replaceChildren();
  }

  function renderRecommendations(items, source) {
    const list = $("recommendations");
    list.dataset.source = source;
    list.replaceChildren(
      ...items.map((item) =>
        el(
          "li",
          { "data-item-id": item.item_id, class: "recommendation" },
          el(
            "div",
            { class: "recommendation-head" },
            el("span", { class: "name", text: item.name }),
            el("span", { class: "code", text: item.item_id }),
            el("span", { class: "price", text: price(item.price) }),
          ),
          item.because && item.because.length
            ? el(
                "div",
                { class: "because" },
                "because you bought ",
                item.because.map((b, i) => [
                  i ? ", " : "",
                  el("span", { title: "weight " + b.weight.toFixed(3), text: b.name }),
                ]),
              )
            : null,
        ),
      ),
    );
  }

  function search(text) {
    clearTimeout(state.searchTimer);
    state.searchTimer = setTimeout(async () => {
      const serial = ++state.searchSerial;
      // Only the words typed are sent; the basket is not.
      let items;
      try {
        ({ items } = await getJson("/items?q=" + encodeURIComponent(text) + "&limit=12"));
      } catch (error) {
        items = null;
        $("search-results").replaceChildren(el("li", { class: "empty warning", text: "Search failed: " + error.message }));
      }
      if (serial !== state.searchSerial || items === null) return;
      $("search-results").replaceChildren(
        ...(items.length
          ? items.map((item) =>
              el(
                "li",
                { "data-item-id": item.item_id },
                el("span", { class: "name", text: item.name }),
                el("span", { class: "price", text: price(item.price) }),
                el("button", {
                  type: "button",
                  class: "add",
                  text: "Add",
                  onclick: () => addToBasket(item),
                }),
              ),
            )
          : [el("li", { class: "empty muted", text: "nothing matches" })]),
      );
      markBasketInResults();
      $("search-results").dataset.query = text;
    }, 150);
  }

  // Search hits already in the basket cannot be added twice.
  function markBasketInResults() {
    const inBasket = new Set(state.basket.map((b) => b.item_id));
    for (const row of $("search-results").querySelectorAll("li[data-item-id]")) {
      const button = row.querySelector("button.add");
      const added = inBasket.has(row.dataset.itemId);
      button.disabled = added;
      button.textContent = added ? "In basket" : "Add";
    }
  }

  function addToBasket(item) {
    if (!state.basket.some((b) => b.item_id === item.item_id)) state.basket.push(item);
    renderBasket();
    recommendBasket();
  }

  function removeFromBasket(itemId) {
    state.basket = state.basket.filter((b) => b.item_id !== itemId);
    renderBasket();
    if (state.basket.length) recommendBasket();
    else clearRecommendations();
  }

  function renderBasket() {
    markBasketInResults();
    const list = $("basket");
    $("basket-count").textContent = state.basket.length ? "(" + state.basket.length + ")" : "";
    list.replaceChildren(
      ...(state.basket.length
        ? state.basket.map((item) =>
            el(
              "li",
              { "data-item-id": item.item_id },
              el("span", { class: "name", text: item.name }),
              el("button", {
                type: "button",
                class: "remove",
                title: "Remove from the basket",
                "aria-label": "Remove " + item.name,
                text: "×",
                onclick: () => removeFromBasket(item.item_id),
              }),
            ),
          )
        : [el("li", { class: "empty muted", text: "empty" })]),
    );
  }

  // The anonymous shopper: fold-in and ranking in this browser; no request carries the basket.
  async function recommendBasket() {
    if (!state.basket.length) return clearRecommendations();
    state.mode = "basket";
    $("customer").value = "";
    $("recommendations-title").textContent = "Recommendations for your basket";
    let model;
    try {
      model = await state.model;
    } catch (error) {
      // Never fall back to the server: that would send the basket.
      $("recommendations-note").textContent = "The model did not load, so this basket cannot be scored in the browser.";
      $("recommendations").replaceChildren();
      return;
    }
    const answer = model.recommend(
      state.basket.map((b) => b.item_id),
      state.silo,
      K,
    );
    if (state.mode !== "basket") return;
    $("recommendations-note").textContent =
      "Computed in this browser in " + answer.milliseconds.toFixed(0) + " ms from your " +
      state.basket.length + "-item basket at " + state.silo + "; the basket was not sent anywhere.";
    renderRecommendations(answer.items, "browser");
    $("recommendations").dataset.basket = String(state.basket.length);
  }

  function startModel() {
    state.model = FedShopFoldIn.loadModel();
    state.model.then(
      (model) => {
        $("model-status").textContent =
          "Model downloaded once: " + model.n.toLocaleString("en") + " items, " +
          kilobytes(model.bytes) + " in " + model.loadMilliseconds.toFixed(0) + " ms";
        $("model-status").dataset.ready = "true";
      },
      (error) => {
        $("model-status").textContent = "The model did not load (" + error.message + "): baskets cannot be scored here.";
      },
    );
  }

  // ---- operator view -----------------------------------------------------------------------------

  const METHOD_COLOURS = {
    federated: "#1f6f5c",
    centralized: "#3b6fb6",
    local_only: "#c2571a",
    popularity: "#7a7f87",
  };

  async function loadRuns(selected) {
    const { root, runs } = await getJson("/api/runs");
    $("runs-root").textContent = runs.length ? "Run folders in " + root : "No run folders in " + root;
    const methods = ["federated", "centralized", "local_only", "popularity"];
    const head = el(
      "tr",
      {},
      ["run", "date", "dataset", "mode", "model"].map((h) => el("th", { text: h })),
      methods.map((m) => el("th", { text: "HR@10 " + m.replace("_", "-") })),
      el("th", { text: "ε" }),
    );
    const rows = runs.map((run) =>
      el(
        "tr",
        {
          class: "clickable" + (run.name === selected ? " selected" : ""),
          "data-run": run.name,
          onclick: () => (location.hash = "#operator/" + encodeURIComponent(run.name)),
        },
        el(
          "td",
          {},
          run.name,
          run.served ? el("span", { class: "muted", text: " (served)" }) : null,
          run.incomplete ? el("span", { class: "warning", text: " (incomplete)" }) : null,
        ),
        el("td", { text: run.date.replace("T", " ").replace("Z", "") }),
        el("td", { text: run.dataset ?? run.error ?? "" }),
        el("td", { text: run.mode ?? "" }),
        el("td", { text: run.model ?? "" }),
        methods.map((m) => el("td", { class: "number", text: fmt((run.hr_at_10 || {})[m], 3) })),
        el("td", { class: "number", text: run.epsilon === null || run.epsilon === undefined ? "∞" : fmt(run.epsilon, 2) }),
      ),
    );
    $("runs").replaceChildren(el("thead", {}, head), el("tbody", {}, rows));
  }

  async function showRun(name) {
    const target = $("run-detail");
    target.replaceChildren(el("p", { class: "muted", text: "Loading " + name + "…" }));
    let run;
    try {
      run = await getJson("/api/runs/" + encodeURIComponent(name));
    } catch (error) {
      target.replaceChildren(el("p", { class: "warning", text: error.message }));
      return;
    }
    target.replaceChildren(
      el("h2", { text: run.name }),
      el(
        "p",
        { class: "muted" },
        [run.dataset, run.mode, run.model, run.rounds + " rounds", "seed " + run.settings.seed,
         run.settings.protocol + " ranking", "fedshop " + run.settings.fedshop_version].join(" · "),
      ),
      section("HR@10 per round", "curve", curveSection(run)),
      section("Per storefront", "per-silo", perSiloTable(run)),
      section("Privacy", "privacy", privacySection(run)),
      section("Data", "data-report", dataSection(run.data_report)),
      section("New shoppers (cold start)", "cold-start", coldStartSection(run.cold_start)),
      section("Cross-border insight", "insight", insightSection(run)),
    );
  }

  function section(title, id, ...content) {
    return el("div", { class: "run-section", id: "section-" + id }, el("h3", { text: title }), content);
  }

  function svg(tag, attrs = {}) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    return node;
  }

  // Federated HR@10 after each round, the baselines' own curves where they have one (centralized,
  // per epoch) and otherwise their final value as a dashed line.
  function curveSection(run) {
    const series = [];
    const federated = run.history
      .filter((h) => typeof h["hr@10"] === "number")
      .map((h) => [h.round, h["hr@10"]]);
    if (federated.length) series.push({ method: "federated", points: federated });
    for (const [method, curve] of Object.entries(run.curves || {})) {
      const points = curve.filter((c) => typeof c["hr@10"] === "number").map((c) => [c.step, c["hr@10"]]);
      if (points.length && method !== "federated") series.push({ method, points });
    }
    for (const [method, summary] of Object.entries(run.methods)) {
      if (series.some((s) => s.method === method) || typeof summary["hr@10"] !== "number") continue;
      series.push({ method, level: summary["hr@10"] });
    }
    if (!series.length) return el("p", { class: "muted", text: "No per-round metrics in this run." });
    const width = 640, height = 260, left = 48, right = 16, top = 12, bottom = 32;
    const xs = series.flatMap((s) => (s.points || []).map((p) => p[0]));
    const ys = series.flatMap((s) => (s.points ? s.points.map((p) => p[1]) : [s.level]));
    const xMax = Math.max(1, ...xs), xMin = Math.min(xMax, ...(xs.length ? xs : [1]));
    const yMax = Math.max(0.01, ...ys) * 1.1;
    const x = (v) => left + (xMax === xMin ? 0.5 : (v - xMin) / (xMax - xMin)) * (width - left - right);
    const y = (v) => top + (1 - v / yMax) * (height - top - bottom);
    const chart = svg("svg", { class: "curve", viewBox: `0 0 ${width} ${height}`, width, height, role: "img" });
    const title = chart.appendChild(svg("title"));
    title.textContent = "HR@10 per round: federated against the baselines";
    for (let i = 0; i <= 4; i++) {
      const v = (yMax / 4) * i;
      chart.append(svg("line", { x1: left, x2: width - right, y1: y(v), y2: y(v), stroke: "#e6e9ed" }));
      const label = chart.appendChild(svg("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end" }));
      label.textContent = v.toFixed(2);
    }
    const ticks = [...new Set([xMin, Math.round((xMin + xMax) / 2), xMax])];
    for (const t of ticks) {
      const label = chart.appendChild(svg("text", { x: x(t), y: height - bottom + 16, "text-anchor": "middle" }));
      label.textContent = String(t);
    }
    const axis = chart.appendChild(svg("text", { x: (left + width - right) / 2, y: height - 2, "text-anchor": "middle" }));
    axis.textContent = "round (baselines: epoch)";
    for (const s of series) {
      const colour = METHOD_COLOURS[s.method] || "#444";
      if (s.points) {
        const line = svg("polyline", {
          points: s.points.map(([a, b]) => `${x(a).toFixed(1)},${y(b).toFixed(1)}`).join(" "),
          fill: "none", stroke: colour, "stroke-width": s.method === "federated" ? 2.5 : 1.8,
          "data-series": s.method,
        });
        chart.append(line);
        for (const [a, b] of s.points) chart.append(svg("circle", { cx: x(a), cy: y(b), r: 2.5, fill: colour }));
      } else {
        chart.append(svg("line", {
          x1: left, x2: width - right, y1: y(s.level), y2: y(s.level),
          stroke: colour, "stroke-width": 1.5, "stroke-dasharray": "6 4", "data-series": s.method,
        }));
      }
    }
    const legend = el(
      "div",
      { class: "legend" },
      series.map((s) => {
        const last = s.points ? s.points[s.points.length - 1][1] : s.level;
        const span = el("span", { "data-series": s.method, text: s.method.replace("_", "-") + " " + fmt(last, 3) });
        span.style.setProperty("--swatch", METHOD_COLOURS[s.method] || "#444");
        return span;
      }),
    );
    return [chart, legend];
  }

  function perSiloTable(run) {
    const silos = Object.entries(run.per_silo || {});
    if (!silos.length) return el("p", { class: "muted", text: "No per-storefront metrics." });
    const methods = Object.keys(run.methods);
    const head = el(
      "tr",
      {},
      el("th", { text: "storefront" }),
      el("th", { text: "test customers" }),
      methods.map((m) => el("th", { text: "HR@10 " + m.replace("_", "-") })),
    );
    const rows = silos.map(([silo, byMethod]) => {
      const users = Object.values(byMethod).find((v) => v && typeof v.users === "number");
      return el(
        "tr",
        { "data-silo": silo },
        el("td", { text: silo }),
        el("td", { class: "number", text: fmt(users ? users.users : null) }),
        methods.map((m) => el("td", { class: "number", text: fmt((byMethod[m] || {})["hr@10"], 3) })),
      );
    });
    return el("table", { class: "data", id: "per-silo-table" }, el("thead", {}, head), el("tbody", {}, rows));
  }

  function facts(pairs) {
    return el(
      "dl",
      { class: "facts" },
      pairs.filter(([, v]) => v !== null && v !== undefined && v !== "").map(([k, v]) => [
        el("dt", { text: k }),
        el("dd", { text: typeof v !== "number" || Number.isInteger(v) ? fmt(v) : fmt(v, Math.abs(v) < 0.01 ? 8 : 3) }),
      ]),
    );
  }

  function privacySection(run) {
    const p = run.privacy || {};
    const out = [];
    if (p.epsilon === null || p.epsilon === undefined) {
      out.push(el("p", { id: "privacy-summary", text: "No differential privacy in this run (ε = ∞)." }));
    } else {
      out.push(el("p", { id: "privacy-summary" }, "Differential privacy: ε = " + fmt(p.epsilon, 2) + ", δ = " + fmt(p.delta, 8)));
      out.push(facts([
        ["protected unit", p.unit], ["mechanism", p.mechanism], ["accountant", p.accountant],
        ["noise multiplier", p.noise_multiplier], ["clip", p.clip], ["sampling rate", p.sampling_rate],
        ["steps", p.steps], ["δ sized to", p.delta_population],
      ]));
      if (p.noise_seed_known) {
        out.push(el("p", { class: "warning", text: "The noise came from a known seed: this run is not private (debugging only)." }));
      }
    }
    const protection = run.protection || {};
    out.push(facts([
      ["protection of updates", protection.kind || "none"],
      ["seconds per round", protection.seconds_per_round],
      ["bytes per client per round", protection.bytes_per_client_per_round],
    ]));
    const ledger = run.ledger || {};
    if (!ledger.available) {
      out.push(el("p", { class: "muted", id: "ledger-missing", text: "Ledger: " + (ledger.message || "not available") }));
    } else {
      out.push(el("p", { class: "muted", text: "ε spent per storefront on " + ledger.dataset + ", by every run, from the ledger " + ledger.url + ":" }));
      out.push(
        el(
          "table",
          { class: "data", id: "ledger-table" },
          el("thead", {}, el("tr", {}, ["storefront", "ε spent", "ε budget", "ε left", "δ spent", "runs"].map((h) => el("th", { text: h })))),
          el(
            "tbody",
            {},
            ledger.silos.map((b) =>
              el(
                "tr",
                { "data-silo": b.silo },
                el("td", { text: b.silo }),
                el("td", { class: "number", text: fmt(b.spent_epsilon, 2) }),
                el("td", { class: "number", text: b.budget_epsilon === null ? "none set" : fmt(b.budget_epsilon, 2) }),
                el("td", { class: "number", text: b.budget_epsilon === null ? "–" : fmt(b.budget_epsilon - b.spent_epsilon, 2) }),
                el("td", { class: "number", text: fmt(b.spent_delta, 8) }),
                el("td", { class: "number", text: fmt(b.runs) }),
              ),
            ),
          ),
        ),
      );
    }
    return out;
  }

  function dataSection(report) {
    if (!report || !Object.keys(report).length) return el("p", { class: "muted", text: "No data report." });
    const cleaning = report.cleaning || {};
    const split = report.split || {};
    const out = [
      facts([
        ["dataset", report.dataset], ["source", report.source],
        ["dates", Array.isArray(report.date_range) ? report.date_range.join(" to ") : null],
        ["purchase rows", cleaning.purchase_rows], ["customers", cleaning.customers ?? split.users],
        ["products", cleaning.products], ["split", report.split_rule],
        ["training pairs", split.train_pairs], ["test customers", split.test_users],
      ]),
    ];
    if (Array.isArray(report.silos) && report.silos.length) {
      const keys = Object.keys(report.silos[0]).filter((k) => k !== "silo");
      out.push(
        el(
          "table",
          { class: "data" },
          el("thead", {}, el("tr", {}, el("th", { text: "storefront" }), keys.map((k) => el("th", { text: k.replaceAll("_", " ") })))),
          el("tbody", {}, report.silos.map((s) => el("tr", {}, el("td", { text: s.silo }), keys.map((k) => el("td", { class: "number", text: fmt(s[k]) }))))),
        ),
      );
    }
    return out;
  }

  function coldStartSection(cold) {
    if (!cold) {
      return el("p", { class: "not-computed", text: "Not computed for this run: train with --cold-start (the [eval] cold_start fraction of repeat customers held out as new shoppers) to measure them." });
    }
    const metrics = ["hr@10", "ndcg@10", "recall@20"];
    const methods = ["fold_in", "popularity", "trained"].filter((m) => cold[m]);
    const out = [
      el("p", { text: "New shoppers held out of training: " + fmt(cold.customers) + " evaluated, from their first-day basket." }),
      cold.rule ? el("p", { class: "muted", text: "Rule: " + cold.rule + "." }) : null,
      el(
        "table",
        { class: "data", id: "cold-start-table" },
        el("thead", {}, el("tr", {}, el("th", { text: "method" }), metrics.map((m) => el("th", { text: m })))),
        el("tbody", {}, methods.map((m) => el("tr", { title: (cold.methods || {})[m] || "" }, el("td", { text: m.replace("_", "-") }), metrics.map((k) => el("td", { class: "number", text: fmt(cold[m][k], 3) }))))),
      ),
    ];
    const ratio = (other) => {
      const value = ((cold.ratios || {})["fold_in/" + other] || {})["hr@10"];
      return value === null || value === undefined ? null : fmt(value, 2) + "×";
    };
    out.push(facts([
      ["fold-in HR@10 ÷ popularity's", ratio("popularity")],
      ["fold-in HR@10 ÷ trained vectors'", ratio("trained")],
      ["median fold-in time", cold.fold_in_ms_median === null || cold.fold_in_ms_median === undefined ? null : fmt(cold.fold_in_ms_median, 1) + " ms"],
    ]));
    const silos = Object.entries(cold.per_silo || {});
    if (silos.length) {
      out.push(
        el(
          "table",
          { class: "data", id: "cold-start-per-silo" },
          el("thead", {}, el("tr", {}, el("th", { text: "storefront" }), el("th", { text: "new shoppers" }), methods.map((m) => el("th", { text: "HR@10 " + m.replace("_", "-") })))),
          el(
            "tbody",
            {},
            silos.map(([silo, byMethod]) =>
              el(
                "tr",
                { "data-silo": silo },
                el("td", { text: silo }),
                el("td", { class: "number", text: fmt((byMethod.fold_in || {}).users) }),
                methods.map((m) => el("td", { class: "number", text: fmt((byMethod[m] || {})["hr@10"], 3) })),
              ),
            ),
          ),
        ),
      );
    }
    return out;
  }

  function insightSection(run) {
    const insight = run.insight;
    if (!insight) return el("p", { class: "not-computed", text: run.insight_hint });
    if (insight.error) return el("p", { class: "warning", text: insight.error });
    const interval = insight.interval || {};
    const out = [
      el("p", {}, "Products that over-index in each storefront against the whole shop, from counts each storefront released under differential privacy (ε = " + fmt(insight.epsilon, 2) + ", δ = " + fmt(insight.delta, 8) + "). Lift = the storefront's share of customers buying the item ÷ the whole shop's; " + Math.round((interval.level || 0) * 100) + "% intervals."),
    ];
    if (insight.noise_seed_known) out.push(el("p", { class: "warning", text: "The noise came from a known seed: not private (debugging only)." }));
    for (const store of insight.storefronts || []) {
      out.push(el("h4", { text: store.name + " (about " + fmt(Math.round(store.customers)) + " customers)" }));
      if (!store.items || !store.items.length) {
        out.push(el("p", { class: "muted", text: "Nothing over-indexes clearly above the noise." }));
        continue;
      }
      out.push(
        el(
          "table",
          { class: "data insight-table", "data-silo": store.name },
          el("thead", {}, el("tr", {}, ["item", "name", "lift", "interval", "customers (noisy)"].map((h) => el("th", { text: h })))),
          el(
            "tbody",
            {},
            store.items.map((item) =>
              el(
                "tr",
                {},
                el("td", { class: "code", text: item.item_id }),
                el("td", { text: item.name }),
                el("td", { class: "number", text: fmt(item.lift, 2) }),
                el("td", { class: "number", text: Array.isArray(item.interval) ? fmt(item.interval[0], 2) + " – " + fmt(item.interval[1], 2) : "" }),
                el("td", { class: "number", text: fmt(item.count, 1) }),
              ),
            ),
          ),
        ),
      );
    }
    return out;
  }

  // ---- views -------------------------------------------------------------------------------------

  function route() {
    const hash = decodeURIComponent(location.hash.slice(1));
    const operator = hash === "operator" || hash.startsWith("operator/");
    $("shopper-view").hidden = operator;
    $("operator-view").hidden = !operator;
    $("tab-shopper").classList.toggle("active", !operator);
    $("tab-operator").classList.toggle("active", operator);
    if (operator) {
      const name = hash.startsWith("operator/") ? hash.slice("operator/".length) : null;
      loadRuns(name).catch((error) => ($("runs-root").textContent = "Cannot list the runs: " + error.message));
      if (name) showRun(name);
      else $("run-detail").replaceChildren();
    }
  }

  async function start() {
    startModel();
    getJson("/health").then((health) => {
      $("run-info").textContent = "Run " + health.run + " · " + health.model + " · " + health.mode + " · " + health.items.toLocaleString("en") + " items";
    });
    $("customer").addEventListener("change", (event) => {
      if (event.target.value) recommendCustomer(event.target.value);
      else clearRecommendations();
    });
    $("search").addEventListener("input", (event) => search(event.target.value));
    $("clear-basket").addEventListener("click", () => {
      state.basket = [];
      renderBasket();
      clearRecommendations();
    });
    window.addEventListener("hashchange", route);
    route();
    search("");
    await loadStorefronts();
    document.body.dataset.ready = "true";
  }

  window.FedShopPage = {
    get model() {
      return state.model;
    },
    get basket() {
      return state.basket.map((b) => b.item_id);
    },
  };
  start();
})();
