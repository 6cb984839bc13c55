// A ClearSky export: the tiles of one archive (PMTiles, read with HTTP Range requests) or of a
// plain {z}/{x}/{y} folder, on a Leaflet map. No server but a static one; nothing from a CDN.
// `clearsky export` writes the settings into index.html (#clearsky-export).
/* global L, pmtiles */
(() => {
  const cfg = JSON.parse(document.getElementById('clearsky-export').textContent);
  // Leaflet asks for every tile that touches a box, the export holds those that overlap one:
  // a hair inside keeps the two the same set (no request for a missing tile).
  const eps = 1e-7;
  const inside = ([w, s, e, n]) => L.latLngBounds([s + eps, w + eps], [n - eps, e - eps]);
  const bounds = inside(cfg.bounds);
  const boxes = cfg.boxes.map(inside); // one per cell: not the sea between two far cells
  const zooms = { minZoom: cfg.minzoom, maxZoom: cfg.maxzoom + 2 };
  const map = L.map('map', zooms);
  const options = {
    ...zooms,
    maxNativeZoom: cfg.maxzoom, // closer in, Leaflet enlarges the finest tiles
    bounds,
    tileSize: cfg.tilesize,
    attribution: cfg.attribution,
  };
  const layer = cfg.archive
    ? pmtiles.leafletRasterLayer(new pmtiles.PMTiles(new URL(cfg.archive, document.baseURI).href), options)
    : L.tileLayer(cfg.tiles, options);
  const valid = layer._isValidTile; // Leaflet's own test (zoom range, bounds), then the boxes
  layer._isValidTile = function (coords) {
    if (!valid.call(this, coords)) return false;
    const tile = this._tileCoordsToBounds(coords);
    return boxes.some((b) => b.intersects(tile));
  };
  layer.addTo(map);
  L.control.scale({ imperial: false }).addTo(map);
  // Zoomed far out a cell is a few pixels: a dot shows where it is, a click zooms onto it.
  const dots = boxes.map((b) =>
    L.circleMarker(b.getCenter(), { radius: 6, color: '#c0392b', weight: 2, fillOpacity: 0.5 })
      .on('click', () => map.fitBounds(b)));
  const showDots = () => {
    boxes.forEach((b, i) => {
      const size = map.project(b.getNorthEast()).subtract(map.project(b.getSouthWest()));
      const small = Math.abs(size.x) < 24 && Math.abs(size.y) < 24;
      if (small !== map.hasLayer(dots[i])) (small ? dots[i].addTo(map) : dots[i].remove());
    });
  };
  map.on('zoomend', showDots);
  map.fitBounds(bounds);
  showDots();
  if (window.self !== window.top) {
    // In a blog post's iframe the wheel scrolls the post until the map is clicked.
    map.scrollWheelZoom.disable();
    map.on('click focus', () => map.scrollWheelZoom.enable());
    map.on('mouseout blur', () => map.scrollWheelZoom.disable());
  }
  window.clearskyExport = { map, layer, dots, config: cfg };
})();
