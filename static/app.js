// ClearSky viewer: one composited tile layer per cell, a small control panel, and the whole view
// (map position and composite options) in the URL hash. Plain Leaflet, no framework, no build.
/* global L */

const ATTRIBUTION = 'Contains modified Copernicus Sentinel data';
const TILES = 'tiles/WebMercatorQuad/{z}/{x}/{y}.png';
const LAYERS = ['composite', 'date', 'count'];
const MASKS = ['scl', 'segformer', 'none'];
const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];
const DEFAULTS = {
  cell: '', layer: 'composite', percentile: 25, mask: 'scl', start: '', end: '', months: '', date: '',
};
const ISO_DATE = /^\d{4}-\d{2}-\d{2}$/;

const base = new URL('.', document.baseURI).href; // the server root, also behind a path prefix
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

const state = { ...DEFAULTS };
const cells = new Map(); // id -> summary from /cells
const layers = {}; // id -> L.TileLayer
const outlines = {}; // id -> L.Rectangle

const map = L.map('map', { minZoom: 2, maxZoom: 18, worldCopyJump: true });
map.attributionControl.addAttribution(ATTRIBUTION);
L.control.scale({ imperial: false }).addTo(map);
const Panel = L.Control.extend({
  onAdd() {
    const el = $('panel');
    el.hidden = false;
    L.DomEvent.disableClickPropagation(el);
    L.DomEvent.disableScrollPropagation(el);
    return el;
  },
});
new Panel({ position: 'topright' }).addTo(map);
window.clearsky = { map, layers, outlines, cells, state };

// ---- state <-> URL -------------------------------------------------------------------------

/** Only valid values get into the state: a hand-edited hash cannot produce a 422 tile. */
function sanitize(raw) {
  const s = {};
  if (cells.has(raw.cell)) s.cell = raw.cell;
  if (LAYERS.includes(raw.layer)) s.layer = raw.layer;
  if (MASKS.includes(raw.mask)) s.mask = raw.mask;
  const p = Number(raw.percentile);
  if (raw.percentile !== undefined && raw.percentile !== '' && p >= 0 && p <= 100) {
    s.percentile = p;
  }
  for (const k of ['start', 'end', 'date']) if (ISO_DATE.test(raw[k] ?? '')) s[k] = raw[k];
  if (raw.months !== undefined) s.months = normMonths(String(raw.months).split(','));
  return s;
}

function normMonths(list) {
  const ms = [...new Set(list.map(Number))].filter((m) => m >= 1 && m <= 12).sort((a, b) => a - b);
  return ms.length === 12 ? '' : ms.join(',');
}

function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  const raw = Object.fromEntries(Object.keys(DEFAULTS).filter((k) => h.has(k))
    .map((k) => [k, h.get(k)]));
  const v = (h.get('map') || '').split('/').map(Number);
  const view = v.length === 3 && v.every(Number.isFinite) ? { zoom: v[0], center: [v[1], v[2]] } : null;
  return { state: sanitize(raw), view };
}

function hashString() {
  const c = map.getCenter();
  const parts = [`map=${map.getZoom()}/${c.lat.toFixed(5)}/${c.lng.toFixed(5)}`];
  for (const k of Object.keys(DEFAULTS)) {
    const v = state[k];
    if (v === '' || (k === 'date' && state.layer !== 'date')) continue;
    parts.push(`${k}=${encodeURIComponent(v).replace(/%2C/g, ',')}`);
  }
  return '#' + parts.join('&');
}

function writeHash() {
  const h = hashString();
  if (h !== location.hash) history.replaceState(null, '', h); // no history spam, no hashchange
}

/** Tile query: only the parameters that change the chosen layer, so caches are shared. */
function tileQuery() {
  const q = [['layer', state.layer]];
  if (state.layer === 'date') {
    q.push(['date', state.date]);
  } else {
    if (state.layer === 'composite') q.push(['percentile', state.percentile]);
    q.push(['mask', state.mask]);
    for (const k of ['start', 'end', 'months']) if (state[k]) q.push([k, state[k]]);
  }
  return q.map(([k, v]) => `${k}=${encodeURIComponent(v).replace(/%2C/g, ',')}`).join('&');
}

const tileUrl = (id) => `${base}cells/${encodeURIComponent(id)}/${TILES}?${tileQuery()}`;

// ---- cells ---------------------------------------------------------------------------------

const cellBounds = (c) => L.latLngBounds([c.bounds[1], c.bounds[0]], [c.bounds[3], c.bounds[2]]);

async function tileJson(id) {
  try {
    const r = await fetch(`${base}cells/${encodeURIComponent(id)}/WebMercatorQuad/tilejson.json`);
    if (r.ok) return await r.json();
  } catch { /* fall through to defaults */ }
  return { minzoom: 8, maxzoom: 16 };
}

function addCell(c, tj) {
  const bounds = cellBounds(c);
  const layer = L.tileLayer(tileUrl(c.id), {
    bounds, // no requests (and no 404s) outside the cell
    minZoom: Math.max(0, tj.minzoom ?? 8),
    maxNativeZoom: Math.min(tj.maxzoom ?? 16, 16),
    maxZoom: 18,
    className: 'cell-tiles',
  });
  layer.on('loading', () => setStatus('Compositing tiles…', 'busy'));
  layer.on('load', () => setStatus(''));
  layer.on('tileerror', (e) => explainTileError(e.tile.src));
  layers[c.id] = layer;

  const range = c.start ? `${c.start} – ${c.end}` : 'no scenes';
  const tooltip = `<b>${esc(c.title)}</b><br>${esc(c.id)} · ${c.scene_count} scenes<br>${range}`;
  outlines[c.id] = L.rectangle(bounds, { className: 'cell-outline', weight: 2, fill: false })
    .bindTooltip(tooltip, { sticky: true })
    .on('click', () => selectCell(c.id))
    .addTo(map);
  // Zoomed out a cell is smaller than a pixel: a dot finds it, a click zooms to it.
  L.circleMarker(bounds.getCenter(), { className: 'cell-dot', radius: 7, weight: 2 })
    .bindTooltip(tooltip)
    .on('click', () => selectCell(c.id))
    .addTo(dots);
}

const dots = L.layerGroup();
function toggleDots() {
  const minZoom = Math.min(...Object.values(layers).map((l) => l.options.minZoom));
  if (map.getZoom() < minZoom) dots.addTo(map);
  else dots.remove();
}

async function explainTileError(src) {
  try {
    const r = await fetch(src);
    const detail = r.ok ? '' : (await r.json()).detail;
    if (detail) setStatus(`Tile error: ${detail}`, 'error');
  } catch (err) {
    setStatus(`Tile error: ${err}`, 'error');
  }
}

const contains = (id, latlng) => cellBounds(cells.get(id)).contains(latlng);

function selectCell(id, fit = true) {
  if (id !== state.cell) {
    const dates = cells.get(id).dates;
    state.cell = id;
    state.date = nearestDate(dates, state.date);
    apply();
  }
  if (fit) map.fitBounds(cellBounds(cells.get(id)));
}

function nearestDate(dates, date) {
  if (!dates.length) return '';
  if (!date) return dates[dates.length - 1];
  const t = Date.parse(date);
  return dates.reduce((a, b) => (Math.abs(Date.parse(b) - t) < Math.abs(Date.parse(a) - t) ? b : a));
}

// ---- apply the state -----------------------------------------------------------------------

function apply() {
  for (const [id, layer] of Object.entries(layers)) {
    // One date is one scene of one cell: other cells have other dates.
    if (state.layer !== 'date' || id === state.cell) {
      const url = tileUrl(id);
      if (url !== layer._url) {
        // GridLayer.redraw ignores the layer's minZoom: only redraw where tiles belong.
        layer.setUrl(url, true);
        const z = map.getZoom();
        if (map.hasLayer(layer) && z >= layer.options.minZoom && z <= layer.options.maxZoom) {
          layer.redraw();
        }
      }
      if (!map.hasLayer(layer)) layer.addTo(map);
    } else {
      layer.remove();
    }
  }
  for (const [id, o] of Object.entries(outlines)) {
    o.getElement()?.classList.toggle('active', id === state.cell);
  }
  syncPanel();
  writeHash();
}

function setStatus(text, kind = '') {
  const el = $('status');
  el.textContent = text;
  el.className = `status ${kind}`;
}

// ---- panel ---------------------------------------------------------------------------------

function matchingScenes(c) {
  const months = state.months ? state.months.split(',').map(Number) : null;
  return c.dates.filter((d) => (!state.start || d >= state.start) && (!state.end || d <= state.end)
    && (!months || months.includes(Number(d.slice(5, 7))))).length;
}

function syncPanel() {
  const c = cells.get(state.cell);
  $('cell').value = state.cell;
  for (const r of document.querySelectorAll('input[name=layer]')) r.checked = r.value === state.layer;
  const dateSel = $('date');
  if (dateSel.dataset.cell !== state.cell) {
    dateSel.replaceChildren(...c.dates.map((d) => new Option(d, d)));
    dateSel.dataset.cell = state.cell;
  }
  dateSel.value = state.date;
  $('percentile').value = $('percentile-range').value = state.percentile;
  $('mask').value = state.mask;
  $('start').value = state.start;
  $('end').value = state.end;
  const months = state.months ? state.months.split(',').map(Number) : null;
  for (const box of document.querySelectorAll('#months input')) {
    box.checked = !months || months.includes(Number(box.value));
  }
  const isDate = state.layer === 'date';
  $('date-row').hidden = !isDate;
  $('percentile-row').hidden = state.layer !== 'composite';
  $('mask-row').hidden = isDate;
  $('filters').hidden = isDate;
  const n = matchingScenes(c);
  $('legend').hidden = state.layer !== 'count';
  $('legend-max').textContent = n;
  $('xyz').value = tileUrl(state.cell);
  if (!isDate && n === 0) setStatus(`No scene of ${state.cell} matches these dates.`, 'error');
}

function buildPanel() {
  const all = [...cells.values()];
  $('cell').replaceChildren(...all.map((c) => new Option(`${c.id} — ${c.title}`, c.id)));
  const starts = all.map((c) => c.start).filter(Boolean).sort();
  const ends = all.map((c) => c.end).filter(Boolean).sort();
  for (const id of ['start', 'end']) {
    $(id).min = starts[0] ?? '';
    $(id).max = ends[ends.length - 1] ?? '';
  }
  $('months').replaceChildren(...MONTHS.map((name, i) => {
    const label = document.createElement('label');
    label.title = name;
    label.innerHTML = `<input type="checkbox" value="${i + 1}"><span>${name[0]}</span>`;
    return label;
  }));
  const legend = document.createElement('div');
  legend.id = 'legend';
  legend.className = 'legend';
  legend.innerHTML = '<span class="zero">0</span><span class="ramp"></span>'
    + '<span>1 … <span id="legend-max"></span> clear looks</span>';
  $('layer').after(legend);

  const set = (patch) => { Object.assign(state, patch); apply(); };
  $('cell').addEventListener('change', (e) => selectCell(e.target.value));
  $('layer').addEventListener('change', (e) => set({ layer: e.target.value }));
  $('date').addEventListener('change', (e) => set({ date: e.target.value }));
  const step = (d) => {
    const dates = cells.get(state.cell).dates;
    const i = Math.min(Math.max(dates.indexOf(state.date) + d, 0), dates.length - 1);
    set({ date: dates[i] });
  };
  $('date-prev').addEventListener('click', () => step(-1));
  $('date-next').addEventListener('click', () => step(1));
  // The slider shows its value while dragging and requests tiles when released.
  $('percentile-range').addEventListener('input', (e) => { $('percentile').value = e.target.value; });
  $('percentile-range').addEventListener('change', (e) => set({ percentile: Number(e.target.value) }));
  $('percentile').addEventListener('change', (e) => {
    const p = Number(e.target.value);
    if (e.target.value !== '' && p >= 0 && p <= 100) set({ percentile: p });
    else syncPanel();
  });
  $('mask').addEventListener('change', (e) => set({ mask: e.target.value }));
  for (const id of ['start', 'end']) {
    $(id).addEventListener('change', () => {
      const start = $('start').value;
      const end = $('end').value;
      if (start && end && start > end) {
        setStatus('"From" is after "To".', 'error');
        return;
      }
      setStatus('');
      set({ start, end });
    });
  }
  $('months').addEventListener('change', (e) => {
    const on = [...document.querySelectorAll('#months input:checked')].map((b) => b.value);
    if (!on.length) { e.target.checked = true; return; } // at least one month
    set({ months: normMonths(on) });
  });
  $('copy-xyz').addEventListener('click', copyXyz);
  $('panel').addEventListener('submit', (e) => e.preventDefault());
}

async function copyXyz() {
  const input = $('xyz');
  try {
    await navigator.clipboard.writeText(input.value);
  } catch {
    input.select(); // not a secure context: fall back to the selection
    document.execCommand('copy');
  }
  setStatus('XYZ URL copied — in QGIS: XYZ Tiles › New Connection.');
}

// ---- start ---------------------------------------------------------------------------------

function restore({ state: s, view }) {
  setStatus('');
  Object.assign(state, { ...DEFAULTS, cell: state.cell }, s); // what the hash omits is default
  const c = cells.get(state.cell);
  if (!c.dates.includes(state.date)) state.date = nearestDate(c.dates, state.date);
  if (view) map.setView(view.center, view.zoom);
  else map.fitBounds(cellBounds(c));
  apply();
}

async function main() {
  let list;
  try {
    const r = await fetch(`${base}cells`);
    if (!r.ok) throw new Error(`GET cells: HTTP ${r.status}`);
    list = await r.json();
  } catch (err) {
    setStatus(`Could not load the cells: ${err.message}`, 'error');
    map.setView([20, 0], 2);
    return;
  }
  if (!list.length) {
    setStatus('This server has no cells yet (run `clearsky demo`).', 'error');
    map.setView([20, 0], 2);
    return;
  }
  for (const c of list) cells.set(c.id, c);
  const tjs = await Promise.all(list.map((c) => tileJson(c.id)));
  list.forEach((c, i) => addCell(c, tjs[i]));
  buildPanel();
  state.cell = list[0].id;
  restore(readHash());

  toggleDots();
  map.on('zoomend', toggleDots);
  map.on('moveend', () => {
    // Panning onto another cell makes it the active one (date picker, XYZ URL).
    const center = map.getCenter();
    if (!contains(state.cell, center)) {
      const other = list.find((c) => contains(c.id, center));
      if (other) selectCell(other.id, false);
    }
    writeHash();
  });
  window.addEventListener('hashchange', () => restore(readHash())); // a pasted permalink
  document.body.dataset.ready = '1';
}

main();
