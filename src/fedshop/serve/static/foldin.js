// Fold-in in the browser: the same maths as fedshop.models.fold_in, so that an anonymous shopper's
// basket never has to leave the page.
//
// The page downloads the shared model once (/api/model: a JSON manifest, /api/model.bin: the tables,
// float16 for the per-item tables, float32 for the dense weights). For a basket B it fits a user
// vector u by plain gradient descent from u = 0 on
//     L(u) = -(1/|B|) Σ_{j∈B} log softmax(s(u))_j + (l2/2)·‖u‖²
// where s(u) scores the whole catalogue (plus the storefront's private item offsets), then ranks the
// catalogue by s(u) outside the basket and explains each item by the basket items whose interaction
// vectors point most its way. The gradient is written out by hand: dL/ds_i = p_i − [i∈B]/|B|, pushed
// back through the score function (for NeuMF, through its ReLU tower). Arithmetic is float64
// throughout (JavaScript numbers); the tables are exactly the float16 values the server sent.
"use strict";

(function (global) {
  let halfTable = null;

  // Every float16 bit pattern's value, once (65,536 entries): decoding is then one lookup.
  function halves() {
    if (halfTable) return halfTable;
    halfTable = new Float32Array(65536);
    for (let bits = 0; bits < 65536; bits++) {
      const sign = bits & 0x8000 ? -1 : 1;
      const exponent = (bits >> 10) & 0x1f;
      const fraction = bits & 0x3ff;
      let value;
      if (exponent === 0) value = sign * fraction * 2 ** -24;
      else if (exponent === 31) value = fraction ? NaN : sign * Infinity;
      else value = sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
      halfTable[bits] = value;
    }
    return halfTable;
  }

  function readTable(buffer, entry) {
    const count = entry.shape.reduce((a, b) => a * b, 1);
    const view = new DataView(buffer, entry.offset);
    const out = new Float32Array(count);
    if (entry.dtype === "float16") {
      const table = halves();
      for (let i = 0; i < count; i++) out[i] = table[view.getUint16(2 * i, true)];
    } else if (entry.dtype === "float32") {
      for (let i = 0; i < count; i++) out[i] = view.getFloat32(4 * i, true);
    } else {
      throw new Error("unknown table type " + entry.dtype);
    }
    return out;
  }

  class BrowserModel {
    constructor(manifest, buffer) {
      this.manifest = manifest;
      this.name = manifest.model;
      this.n = manifest.n_items;
      this.settings = manifest.fold_in;
      this.items = manifest.items;
      this.indexOf = new Map(manifest.items.ids.map((id, index) => [String(id), index]));
      this.t = {};
      this.shape = {};
      for (const [name, entry] of Object.entries({ ...manifest.tables, ...manifest.dense })) {
        this.t[name] = readTable(buffer, entry);
        this.shape[name] = entry.shape;
      }
      this.offsets = {};
      for (const silo of manifest.silos) {
        this.offsets[silo.name] = silo.item_bias ? readTable(buffer, silo.item_bias) : null;
      }
      if (this.name === "mf-bpr" || this.name === "gmf") {
        this.dim = this.shape.item_embedding[1];
        this.userTables = { user_embedding: this.dim };
      } else if (this.name === "neumf") {
        this.dim = this.shape.item_gmf[1];
        this.userTables = { user_gmf: this.dim, user_mlp: this.shape.item_mlp[1] };
        this.prepareTower();
      } else {
        throw new Error("the page cannot fold in a " + this.name + " model");
      }
      this.vectors = this.interactionVectors();
    }

    // NeuMF: the tower's layers, and the item half of its first layer, which does not depend on
    // the user (computed once: item_mlp @ mlp_item_weight_1).
    prepareTower() {
      const layers = [];
      const first = this.shape.mlp_user_weight_1;
      layers.push({ weight: this.t.mlp_user_weight_1, bias: this.t.mlp_bias_1, in: first[0], out: first[1] });
      for (let layer = 2; this.t["mlp_weight_" + layer]; layer++) {
        const shape = this.shape["mlp_weight_" + layer];
        layers.push({
          weight: this.t["mlp_weight_" + layer],
          bias: this.t["mlp_bias_" + layer],
          in: shape[0],
          out: shape[1],
        });
      }
      this.layers = layers;
      const n = this.n;
      const width = this.shape.item_mlp[1];
      const h1 = first[1];
      const itemWeight = this.t.mlp_item_weight_1;
      const itemMlp = this.t.item_mlp;
      const itemPart = new Float64Array(n * h1);
      for (let i = 0; i < n; i++) {
        for (let k = 0; k < width; k++) {
          const q = itemMlp[i * width + k];
          if (q === 0) continue;
          for (let h = 0; h < h1; h++) itemPart[i * h1 + h] += q * itemWeight[k * h1 + h];
        }
      }
      this.itemPart = itemPart;
      this.activations = layers.map((l) => new Float64Array(n * l.out));
    }

    // fedshop.models.fold_in.interaction_vectors: what "because you bought" compares.
    interactionVectors() {
      const n = this.n;
      const d = this.dim;
      const table = this.name === "neumf" ? this.t.item_gmf : this.t.item_embedding;
      const out = new Float64Array(n * d);
      for (let i = 0; i < n * d; i++) {
        const k = i % d;
        const scale = this.name === "mf-bpr" ? 1 : this.t.output_weight[k];
        out[i] = table[i] * scale;
      }
      return out;
    }

    zeroUser() {
      const user = {};
      for (const [name, width] of Object.entries(this.userTables)) user[name] = new Float64Array(width);
      return user;
    }

    // s(u) for every item (+ offsets); for NeuMF it keeps the tower's pre-activations for backward.
    scores(user, offsets) {
      const n = this.n;
      const d = this.dim;
      const s = new Float64Array(n);
      const bias = this.t.item_bias;
      if (this.name === "neumf") {
        this.towerForward(user.user_mlp);
        const last = this.layers[this.layers.length - 1];
        const top = this.activations[this.activations.length - 1];
        const w = this.t.output_weight;
        const wu = new Float64Array(d);
        for (let k = 0; k < d; k++) wu[k] = w[k] * user.user_gmf[k];
        const q = this.t.item_gmf;
        for (let i = 0; i < n; i++) {
          let total = bias[i];
          for (let k = 0; k < d; k++) total += wu[k] * q[i * d + k];
          for (let h = 0; h < last.out; h++) {
            const a = top[i * last.out + h];
            if (a > 0) total += w[d + h] * a;
          }
          s[i] = total;
        }
      } else {
        const q = this.t.item_embedding;
        const u = user.user_embedding;
        const wu = new Float64Array(d);
        for (let k = 0; k < d; k++) wu[k] = this.name === "gmf" ? this.t.output_weight[k] * u[k] : u[k];
        for (let i = 0; i < n; i++) {
          let total = bias[i];
          for (let k = 0; k < d; k++) total += wu[k] * q[i * d + k];
          s[i] = total;
        }
      }
      if (offsets) for (let i = 0; i < n; i++) s[i] += offsets[i];
      return s;
    }

    // Pre-activations a_l of every layer for every item (z_l = relu(a_l)).
    towerForward(userMlp) {
      const n = this.n;
      const first = this.layers[0];
      const userPart = new Float64Array(first.out);
      for (let h = 0; h < first.out; h++) {
        let total = first.bias[h];
        for (let k = 0; k < first.in; k++) total += userMlp[k] * first.weight[k * first.out + h];
        userPart[h] = total;
      }
      const a1 = this.activations[0];
      for (let i = 0; i < n; i++) {
        for (let h = 0; h < first.out; h++) a1[i * first.out + h] = this.itemPart[i * first.out + h] + userPart[h];
      }
      for (let l = 1; l < this.layers.length; l++) {
        const layer = this.layers[l];
        const below = this.activations[l - 1];
        const a = this.activations[l];
        for (let i = 0; i < n; i++) {
          for (let h = 0; h < layer.out; h++) {
            let total = layer.bias[h];
            for (let m = 0; m < layer.in; m++) {
              const z = below[i * layer.in + m];
              if (z > 0) total += z * layer.weight[m * layer.out + h];
            }
            a[i * layer.out + h] = total;
          }
        }
      }
    }

    // dL/du given g = dL/ds (the tower's pre-activations are those of the last `scores` call) and
    // the L2 weight.
    backward(user, g, l2) {
      const n = this.n;
      const d = this.dim;
      const grads = {};
      const q = this.name === "neumf" ? this.t.item_gmf : this.t.item_embedding;
      const sum = new Float64Array(d); // Σ_i g_i q_i
      for (let i = 0; i < n; i++) {
        const gi = g[i];
        for (let k = 0; k < d; k++) sum[k] += gi * q[i * d + k];
      }
      const dotName = this.name === "neumf" ? "user_gmf" : "user_embedding";
      const dot = new Float64Array(d);
      for (let k = 0; k < d; k++) dot[k] = this.name === "mf-bpr" ? sum[k] : this.t.output_weight[k] * sum[k];
      grads[dotName] = dot;
      if (this.name === "neumf") grads.user_mlp = this.towerBackward(g);
      for (const [name, value] of Object.entries(user)) {
        const grad = grads[name];
        for (let k = 0; k < value.length; k++) grad[k] += l2 * value[k];
      }
      return grads;
    }

    // Backpropagation through the ReLU tower, summed over items: dL/d user_mlp.
    towerBackward(g) {
      const n = this.n;
      const d = this.dim;
      const w = this.t.output_weight;
      const L = this.layers.length;
      const deltas = this.layers.map((l) => new Float64Array(l.out));
      const firstSum = new Float64Array(this.layers[0].out);
      for (let i = 0; i < n; i++) {
        const gi = g[i];
        if (gi === 0) continue;
        // top layer: d s_i / d z_L = w[d:], through its ReLU
        const top = this.layers[L - 1];
        const aTop = this.activations[L - 1];
        let delta = deltas[L - 1];
        for (let h = 0; h < top.out; h++) delta[h] = aTop[i * top.out + h] > 0 ? gi * w[d + h] : 0;
        for (let l = L - 1; l >= 1; l--) {
          const layer = this.layers[l];
          const below = deltas[l - 1];
          const aBelow = this.activations[l - 1];
          for (let m = 0; m < layer.in; m++) {
            if (!(aBelow[i * layer.in + m] > 0)) {
              below[m] = 0;
              continue;
            }
            let total = 0;
            for (let h = 0; h < layer.out; h++) total += delta[h] * layer.weight[m * layer.out + h];
            below[m] = total;
          }
          delta = below;
        }
        for (let h = 0; h < firstSum.length; h++) firstSum[h] += delta[h];
      }
      const first = this.layers[0];
      const grad = new Float64Array(first.in);
      for (let k = 0; k < first.in; k++) {
        let total = 0;
        for (let h = 0; h < first.out; h++) total += first.weight[k * first.out + h] * firstSum[h];
        grad[k] = total;
      }
      return grad;
    }

    // fedshop.models.fold_in.fold_in: basket = item indices; returns the user tables (float64).
    // `settings` (steps, lr, l2) default to the server's.
    foldIn(basket, offsets, settings = this.settings) {
      const items = [...new Set(basket)];
      if (!items.length) throw new Error("a basket needs at least one item");
      const user = this.zeroUser();
      const { steps, lr, l2 } = settings;
      const g = new Float64Array(this.n);
      for (let step = 0; step < steps; step++) {
        const s = this.scores(user, offsets);
        let max = -Infinity;
        for (let i = 0; i < s.length; i++) if (s[i] > max) max = s[i];
        let total = 0;
        for (let i = 0; i < s.length; i++) {
          g[i] = Math.exp(s[i] - max);
          total += g[i];
        }
        for (let i = 0; i < s.length; i++) g[i] /= total;
        for (const j of items) g[j] -= 1 / items.length;
        const grads = this.backward(user, g, l2);
        for (const [name, value] of Object.entries(user)) {
          const grad = grads[name];
          for (let k = 0; k < value.length; k++) value[k] -= lr * grad[k];
        }
      }
      return user;
    }

    // The k best items outside `exclude`, best first: [{index, score}].
    topK(scores, k, exclude) {
      const skip = new Set(exclude);
      const best = [];
      for (let i = 0; i < scores.length; i++) {
        if (skip.has(i)) continue;
        const value = scores[i];
        if (best.length === k && value <= best[k - 1].score) continue;
        let at = best.length;
        while (at > 0 && best[at - 1].score < value) at--;
        best.splice(at, 0, { index: i, score: value });
        if (best.length > k) best.pop();
      }
      return best;
    }

    // fedshop.models.fold_in.contributions, as the server's `because`: up to 3 basket items, by
    // ⟨v_j, v_i⟩, each with a positive weight.
    because(history, item) {
      const d = this.dim;
      const v = this.vectors;
      const weights = history.map((j, order) => {
        let total = 0;
        for (let k = 0; k < d; k++) total += v[j * d + k] * v[item * d + k];
        return { index: j, weight: total, order };
      });
      weights.sort((a, b) => b.weight - a.weight || a.order - b.order);
      return weights.slice(0, 3).filter((w) => w.weight > 0);
    }

    item(index) {
      const price = this.items.prices[index];
      return { item_id: String(this.items.ids[index]), name: this.items.names[index], price: price ?? null };
    }

    // Everything the page shows for an anonymous basket (item ids), computed here.
    recommend(basketIds, silo, k, settings = this.settings) {
      const started = performance.now();
      const basket = [...new Set(basketIds.map((id) => this.indexOf.get(String(id))))].filter(
        (i) => i !== undefined,
      );
      const offsets = silo ? this.offsets[silo] || null : null;
      const user = this.foldIn(basket, offsets, settings);
      const ranked = this.topK(this.scores(user, offsets), k, basket);
      const items = ranked.map(({ index, score }) => ({
        ...this.item(index),
        score,
        because: this.because(basket, index).map((w) => ({
          item_id: String(this.items.ids[w.index]),
          name: this.items.names[w.index],
          weight: w.weight,
        })),
      }));
      return { user, items, milliseconds: performance.now() - started };
    }
  }

  // Download the model once: the manifest, then the binary it names.
  async function loadModel(base = "") {
    const started = performance.now();
    const manifestResponse = await fetch(base + "/api/model");
    if (!manifestResponse.ok) throw new Error("cannot load the model: HTTP " + manifestResponse.status);
    const manifest = await manifestResponse.json();
    const dataResponse = await fetch(base + manifest.data.url);
    if (!dataResponse.ok) throw new Error("cannot load the model tables: HTTP " + dataResponse.status);
    const buffer = await dataResponse.arrayBuffer();
    const model = new BrowserModel(manifest, buffer);
    model.loadMilliseconds = performance.now() - started;
    model.bytes = buffer.byteLength;
    return model;
  }

  global.FedShopFoldIn = { BrowserModel, loadModel, readTable };
})(window);
