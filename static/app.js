// ClearSky viewer: one composited tile layer per cell, a small control panel, and the whole view
// (map position and composite options) in the URL hash. Plain Leaflet, no framework, no build.
// At /embed (or with ?embed=1) the same page is a bare map for an iframe: no panel, the
// attribution and an "Open in ClearSky" link.
/* global L */

const ATTRIBUTION = 'Contains modified Copernicus Sentinel data';
const TILES = 'tiles/WebMercatorQuad/{z}/{x}/{y}.png';
const DISPLAY_TILES = 'tiles/WebMercatorQuad/{z}/{x}/{y}{r}.png'; // {r}: @2x on HiDPI screens
// Viewer layers; 'hillshade' is the composite with the DEM's relief blended in.
const LAYERS = ['composite', 'hillshade', 'count', 'date', 'cloud'];
const ONE_SCENE = ['date', 'cloud']; // one scene of one cell: other cells have other dates
const MASKS = ['auto', 'scl', 'segformer', 'none'];
const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];
const DEFAULTS = {
  cell: '', layer: 'composite', percentile: 25, hillshade: 0.5, mask: 'auto', start: '', end: '',
  months: '', date: '',
};
const ISO_DATE = /^\d{4}-\d{2}-\d{2}$/;

// The server root (also behind a path prefix): the page is served at {root}/ and {root}/embed.
const here = new URL(document.baseURI);
const EMBED_PATH = /\/embed\/?$/.test(here.pathname);
if (EMBED_PATH) here.pathname = here.pathname.replace(/embed\/?$/, '');
const base = new URL('.', here).href;
const EMBED = EMBED_PATH || new URLSearchParams(location.search).get('embed') === '1';

const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const q = (v) => encodeURIComponent(v).replace(/%2C/g, ',');

const state = { ...DEFAULTS };
const cells = new Map(); // id -> summary from /cells
const layers = {}; // id -> L.TileLayer
const outlines = {}; // id -> L.Polygon (the cell's footprint from /cells.geojson)
const dots = L.layerGroup(); // zoomed out a cell is smaller than a pixel: a dot finds it
const labels = L.layerGroup(); // zoomed in: "49NDB · 24 scenes" above each cell
let xyzOneCell = false; // the "only this cell" box of the XYZ URL (not part of the permalink)

document.documentElement.classList.toggle('embed', EMBED);
const map = L.map('map', { minZoom: 2, maxZoom: 18, worldCopyJump: true });
map.attributionControl.addAttribution(ATTRIBUTION);
L.control.scale({ imperial: false }).addTo(map);
window.clearsky = { map, layers, outlines, cells, state, embed: EMBED };

if (EMBED) {
  // A map in a blog post must not hijack the page's scrolling: the wheel zooms once clicked.
  map.scrollWheelZoom.disable();
  map.on('click focus', () => map.scrollWheelZoom.enable());
  map.on('mouseout blur', () => map.scrollWheelZoom.disable());
  const Open = L.Control.extend({
    onAdd() {
      const el = L.DomUtil.create('div', 'open-link leaflet-bar');
      el.innerHTML = '<a id="open-link" target="_blank" rel="noopener" href=".">'
        + 'Open in ClearSky ↗</a>';
      // Without the panel the legends and errors still need a place.
      el.append($('legend'), $('cloud-legend'), $('status'));
      L.DomEvent.disableClickPropagation(el);
      return el;
    },
  });
  new Open({ position: 'topright' }).addTo(map);
} else {
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
}

// ---- state <-> URL -------------------------------------------------------------------------

const inRange = (raw, lo, hi) => raw !== undefined && raw !== '' && Number(raw) >= lo
  && Number(raw) <= hi;

/** Only valid values get into the state: a hand-edited hash cannot produce a 422 tile. */
function sanitize(raw) {
  const s = {};
  if (cells.has(raw.cell)) s.cell = raw.cell;
  if (LAYERS.includes(raw.layer)) s.layer = raw.layer;
  if (MASKS.includes(raw.mask)) s.mask = raw.mask;
  if (inRange(raw.percentile, 0, 100)) s.percentile = Number(raw.percentile);
  if (inRange(raw.hillshade, 0, 1)) s.hillshade = Number(raw.hillshade);
  for (const k of ['start', 'end', 'date']) if (ISO_DATE.test(raw[k] ?? '')) s[k] = raw[k];
  if (s.start && s.end && s.start > s.end) delete s.end;
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
  const ok = v.length === 3 && v.every(Number.isFinite);
  const view = ok ? { zoom: v[0], center: [v[1], v[2]] } : null;
  return { state: sanitize(raw), view };
}

function hashString() {
  const c = map.getCenter();
  const parts = [`map=${map.getZoom()}/${c.lat.toFixed(5)}/${c.lng.toFixed(5)}`];
  for (const k of Object.keys(DEFAULTS)) {
    const v = state[k];
    if (v === '' || (k === 'date' && !ONE_SCENE.includes(state.layer))
      || (k === 'hillshade' && state.layer !== 'hillshade')) continue;
    parts.push(`${k}=${q(v)}`);
  }
  return '#' + parts.join('&');
}

function writeHash() {
  const h = hashString();
  if (h !== location.hash) history.replaceState(null, '', h); // no history spam, no hashchange
  syncShare(h);
}

/** Tile query: only the parameters that change the chosen layer, so caches are shared. */
function tileQuery() {
  const layer = state.layer === 'hillshade' ? 'composite' : state.layer;
  const p = [['layer', layer]];
  if (ONE_SCENE.includes(layer)) {
    p.push(['date', state.date]);
  } else {
    if (layer === 'composite') p.push(['percentile', state.percentile]);
    if (state.layer === 'hillshade') p.push(['hillshade', state.hillshade]);
    if (state.mask !== 'auto') p.push(['mask', state.mask]);  // the server's default
    for (const k of ['start', 'end', 'months']) if (state[k]) p.push([k, state[k]]);
  }
  return p.map(([k, v]) => `${k}=${q(v)}`).join('&');
}

const cellPath = (id) => `cells/${encodeURIComponent(id)}/`;
const displayUrl = (id) => `${base}${cellPath(id)}${DISPLAY_TILES}?${tileQuery()}`;

/** For QGIS & co: the global layer (every cell, seamless), or one cell's. */
function xyzUrl() {
  const one = xyzOneCell || ONE_SCENE.includes(state.layer);
  return `${base}${one ? cellPath(state.cell) : ''}${TILES}?${tileQuery()}`;
}

function embedCode(hash) {
  const src = `${base}embed${hash}`.replace(/&/g, '&amp;').replace(/"/g, '&quot;');
  return `<iframe src="${src}" width="100%" height="450" style="border:0" `
    + 'loading="lazy" allowfullscreen title="ClearSky: cloud-free Sentinel-2"></iframe>';
}

// ---- cells ---------------------------------------------------------------------------------

const cellBounds = (c) => L.latLngBounds([c.bounds[1], c.bounds[0]], [c.bounds[3], c.bounds[2]]);

async function getJson(path) {
  try {
    const r = await fetch(base + path);
    if (r.ok) return await r.json();
  } catch { /* the caller falls back */ }
  return null;
}

function addCell(c, tj, feature) {
  const bounds = cellBounds(c);
  tj = tj || { minzoom: 8, maxzoom: 16 };
  const layer = L.tileLayer(displayUrl(c.id), {
    bounds, // no requests (and no 404s) outside the cell
    minZoom: Math.max(0, tj.minzoom ?? 8),
    maxNativeZoom: Math.min(tj.maxzoom ?? 16, 16),
    maxZoom: 18,
    className: 'cell-tiles',
  });
  layer.on('loading', () => setStatus('Compositing tiles…', 'busy'));
  layer.on('load', () => { if ($('status').classList.contains('busy')) setStatus(''); });
  layer.on('tileerror', (e) => explainTileError(e.tile.src));
  layers[c.id] = layer;

  const range = c.start ? `${c.start} – ${c.end}` : 'no scenes';
  const dem = c.has_dem ? ' · DEM' : '';
  const tooltip = `<b>${esc(c.title)}</b><br>${esc(c.id)} · ${c.scene_count} scenes${dem}`
    + `<br>${range}`;
  // The true footprint (a UTM square is not a lon/lat rectangle); the bounds if it is missing.
  const style = { className: 'cell-outline', weight: 2, fill: false };
  const ring = feature?.geometry?.type === 'Polygon'
    ? L.GeoJSON.coordsToLatLngs(feature.geometry.coordinates, 1) : null;
  outlines[c.id] = (ring ? L.polygon(ring, style) : L.rectangle(bounds, style))
    .bindTooltip(tooltip, { sticky: true })
    .on('click', () => selectCell(c.id));
  if (!EMBED) outlines[c.id].addTo(map);
  L.circleMarker(bounds.getCenter(), { className: 'cell-dot', radius: 7, weight: 2 })
    .bindTooltip(tooltip)
    .on('click', () => selectCell(c.id))
    .addTo(dots);
  L.tooltip({ permanent: true, direction: 'top', className: 'cell-label', offset: [0, -2] })
    .setLatLng([bounds.getNorth(), bounds.getCenter().lng])
    .setContent(`${esc(c.id)} · ${c.scene_count} scenes`)
    .addTo(labels);
}

function toggleDots() {
  const minZoom = Math.min(...Object.values(layers).map((l) => l.options.minZoom));
  const out = map.getZoom() < minZoom;
  if (out) dots.addTo(map);
  else dots.remove();
  if (!out && !EMBED) labels.addTo(map);
  else labels.remove();
}

async function explainTileError(src) {
  try {
    const r = await fetch(src);
    const detail = r.ok ? '' : (await r.json()).detail;
    const text = typeof detail === 'string' ? detail : JSON.stringify(detail);
    if (detail) setStatus(`Tile error: ${text}`, 'error');
  } catch (err) {
    setStatus(`Tile error: ${err}`, 'error');
  }
}

const contains = (id, latlng) => cellBounds(cells.get(id)).contains(latlng);

function selectCell(id, fit = true) {
  if (id !== state.cell) {
    state.cell = id;
    state.date = nearestDate(cells.get(id).dates, state.date);
    apply();
  }
  if (fit) map.fitBounds(cellBounds(cells.get(id)));
}

function nearestDate(dates, date) {
  if (!dates.length) return '';
  if (!date) return dates[dates.length - 1];
  const t = Date.parse(date);
  const dist = (d) => Math.abs(Date.parse(d) - t);
  return dates.reduce((a, b) => (dist(b) < dist(a) ? b : a));
}

// ---- apply the state -----------------------------------------------------------------------

function apply() {
  const z = map.getZoom();
  for (const [id, layer] of Object.entries(layers)) {
    if (!ONE_SCENE.includes(state.layer) || id === state.cell) {
      const url = displayUrl(id);
      if (url !== layer._url) {
        // GridLayer.redraw ignores the layer's minZoom: only redraw where tiles belong.
        layer.setUrl(url, true);
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
  for (const r of document.querySelectorAll('input[name=layer]')) {
    r.checked = r.value === state.layer;
  }
  const dateSel = $('date');
  if (dateSel.dataset.cell !== state.cell) {
    dateSel.replaceChildren(...c.dates.map((d) => new Option(d, d)));
    dateSel.dataset.cell = state.cell;
  }
  dateSel.value = state.date;
  $('percentile').value = $('percentile-range').value = state.percentile;
  $('hillshade').value = $('hillshade-range').value = state.hillshade;
  $('mask').value = state.mask;
  $('start').value = state.start;
  $('end').value = state.end;
  const months = state.months ? state.months.split(',').map(Number) : null;
  for (const box of document.querySelectorAll('#months input')) {
    box.checked = !months || months.includes(Number(box.value));
  }
  const oneScene = ONE_SCENE.includes(state.layer);
  const shaded = state.layer === 'hillshade';
  $('date-row').hidden = !oneScene;
  $('percentile-row').hidden = !['composite', 'hillshade'].includes(state.layer);
  $('hillshade-row').hidden = !shaded;
  $('no-dem').hidden = !shaded || c.has_dem !== false;
  $('mask-row').hidden = oneScene;
  $('filters').hidden = oneScene;
  const n = matchingScenes(c);
  $('legend').hidden = state.layer !== 'count';
  $('legend-max').textContent = n;
  $('cloud-legend').hidden = $('cloud-note').hidden = state.layer !== 'cloud';
  $('xyz-cell').checked = xyzOneCell || oneScene;
  $('xyz-cell').disabled = oneScene;
  $('xyz-cell').parentElement.lastChild.textContent = ` only ${state.cell}`;
  if (!oneScene && n === 0) setStatus(`No scene of ${state.cell} matches these dates.`, 'error');
  else if ($('status').classList.contains('error')) setStatus('');
}

function syncShare(hash) {
  $('xyz').value = xyzUrl();
  $('wmts').href = `${base}WMTSCapabilities.xml?${tileQuery()}`;
  $('embed').value = embedCode(hash);
  const open = $('open-link');
  if (open) open.href = base + hash;
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
  // A slider shows its value while dragging and requests tiles when released.
  const numeric = (name, lo, hi, round) => {
    $(`${name}-range`).addEventListener('input', (e) => { $(name).value = e.target.value; });
    $(`${name}-range`).addEventListener('change', (e) => set({ [name]: round(e.target.value) }));
    $(name).addEventListener('change', (e) => {
      if (inRange(e.target.value, lo, hi)) set({ [name]: round(e.target.value) });
      else syncPanel();
    });
  };
  numeric('percentile', 0, 100, Number);
  numeric('hillshade', 0, 1, (v) => Math.round(Number(v) * 100) / 100);
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
  $('xyz-cell').addEventListener('change', (e) => { xyzOneCell = e.target.checked; writeHash(); });
  $('copy-xyz').addEventListener('click', () => copy('xyz',
    'XYZ URL copied — in QGIS: XYZ Tiles › New Connection.'));
  $('copy-embed').addEventListener('click', () => copy('embed',
    'Embed code copied — paste it into a page\'s HTML.'));
  $('panel').addEventListener('submit', (e) => e.preventDefault());
  const collapse = (on) => {
    $('panel').classList.toggle('collapsed', on);
    $('collapse').textContent = on ? '☰' : '–';
    $('collapse').title = on ? 'Show the controls' : 'Hide the controls';
    $('collapse').setAttribute('aria-expanded', String(!on));
  };
  $('collapse').addEventListener('click', () => {
    collapse(!$('panel').classList.contains('collapsed'));
  });
  if (window.matchMedia('(max-width: 600px)').matches) collapse(true); // phones: map first
}

async function copy(id, message) {
  const input = $(id);
  try {
    await navigator.clipboard.writeText(input.value);
  } catch {
    input.select(); // no clipboard permission: fall back to the selection
    document.execCommand('copy');
  }
  setStatus(message);
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
  const [list, geo] = await Promise.all([getJson('cells'), getJson('cells.geojson')]);
  if (!list) {
    setStatus('Could not load the cells from the server.', 'error');
    map.setView([20, 0], 2);
    return;
  }
  if (!list.length) {
    setStatus('This server has no cells yet (run `clearsky demo`).', 'error');
    map.setView([20, 0], 2);
    return;
  }
  for (const c of list) cells.set(c.id, c);
  const features = new Map((geo?.features ?? []).map((f) => [f.properties?.id ?? f.id, f]));
  const tjs = await Promise.all(list.map((c) => getJson(
    `${cellPath(c.id)}WebMercatorQuad/tilejson.json`)));
  list.forEach((c, i) => addCell(c, tjs[i], features.get(c.id)));
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
