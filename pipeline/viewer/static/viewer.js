// One large image's page. OpenSeadragon does all panning, zooming and tile loading; this file only
// (1) opens a viewer per image on its inline Deep Zoom tile source (no XHR: works from file://),
// (2) keeps the viewers on one viewport: the images cover the same region and OpenSeadragon's
//     viewport coordinates make each image 1 wide, so equal coordinates are the same place, and
// (3) draws each viewer's scale bar from the image's µm/px and the zoom being drawn.
(function () {
  "use strict";

  var page = JSON.parse(document.getElementById("page-data").textContent);
  var UNITS = [["km", 1e9], ["m", 1e6], ["mm", 1e3], ["µm", 1], ["nm", 1e-3]];
  var MAX_BAR_PX = 160;

  // The longest 1, 2 or 5 x 10^n micrometres that fits in maxUm.
  function niceLength(maxUm) {
    var power = Math.pow(10, Math.floor(Math.log10(maxUm)));
    var multiple = [5, 2, 1].find(function (m) { return m * power <= maxUm; }) || 1;
    return multiple * power;
  }

  function formatLength(um) {
    var unit = UNITS.find(function (u) { return um >= u[1]; }) || UNITS[UNITS.length - 1];
    return parseFloat((um / unit[1]).toPrecision(3)) + " " + unit[0];
  }

  function addScaleBar(viewer, element, pixelSizeUm) {
    var bar = element.querySelector(".bar");
    var label = element.querySelector(".label");
    function update() {
      if (!viewer.world.getItemCount()) {
        return;
      }
      // CSS pixels on screen per image pixel, at the zoom on screen now (not the animation's target)
      var screenPxPerImagePx = viewer.viewport.viewportToImageZoom(viewer.viewport.getZoom(true));
      var umPerScreenPx = pixelSizeUm / screenPxPerImagePx;
      var lengthUm = niceLength(MAX_BAR_PX * umPerScreenPx);
      bar.style.width = (lengthUm / umPerScreenPx) + "px";
      label.textContent = formatLength(lengthUm);
      element.dataset.lengthUm = String(lengthUm);
    }
    viewer.addHandler("open", update);
    viewer.addHandler("update-viewport", update);
  }

  // Whichever viewer the user moves leads; the others take its target zoom and centre. The events
  // fire synchronously inside zoomTo/panTo, so the flag stops the followers' own events echoing back.
  function synchronise(viewers) {
    var moving = false;
    viewers.forEach(function (leader) {
      function follow() {
        if (moving) {
          return;
        }
        moving = true;
        var zoom = leader.viewport.getZoom();
        var center = leader.viewport.getCenter();
        viewers.forEach(function (other) {
          if (other !== leader) {
            other.viewport.zoomTo(zoom);
            other.viewport.panTo(center);
          }
        });
        moving = false;
      }
      leader.addHandler("zoom", follow);
      leader.addHandler("pan", follow);
    });
  }

  var viewers = page.images.map(function (image) {
    var viewer = OpenSeadragon({
      id: "viewer-" + image.role,
      prefixUrl: page.library + "/images/",
      tileSources: image.tileSource,
      // Tiles from file:// are cross-origin to a canvas; the 2D canvas draws them, WebGL refuses.
      drawer: "canvas",
      showNavigator: true,
      navigatorPosition: "TOP_RIGHT",
      maxZoomPixelRatio: 2,
      visibilityRatio: 0.5
    });
    addScaleBar(viewer, document.getElementById("scale-" + image.role), image.pixelSizeUm);
    return viewer;
  });
  synchronise(viewers);

  // By role ("generated", "reference"), for the console and the browser test.
  window.rldiffViewers = {};
  page.images.forEach(function (image, i) {
    window.rldiffViewers[image.role] = viewers[i];
  });
})();
