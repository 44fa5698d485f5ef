// What both pages show of a lesion's descriptors: the table rows, and the drawing on the image (the two principal
// axes, dashed where the lesion is asymmetric about them and labelled with why; the regions of each colour).
"use strict";

const LESION_PALETTE = {white: [250, 250, 250], red: [230, 30, 45], light_brown: [205, 150, 95],
  dark_brown: [120, 65, 30], blue_gray: [80, 110, 170], black: [15, 15, 15]};

function lesionRows(d) {
  if (!d || d.diameter_max_px == null) return [["lesion", "none found"]];
  const colours = (d.colours_present || "").split(" ").filter(Boolean).map(c => c.replace("_", " "));
  const axis = name => [`${name} axis`, [["shape", d[`asymmetry_${name}`]], ["colour", d[`asymmetry_colour_${name}`]],
    ["structure", d[`asymmetry_texture_${name}`]]].map(([k, v]) => `${k} ${v.toFixed(2)}`).join(", ")];
  return [["diameter", `${d.diameter_max_px.toFixed(0)} × ${d.diameter_min_px.toFixed(0)} px`],
    ["asymmetric axes", `${d.asymmetry_axes} of 2 (shape alone: ${d.asymmetry_shape_axes})`], axis("major"), axis("minor"),
    ["border", `compactness ${d.compactness.toFixed(2)}, ${d.border_abrupt_sectors} of 8 sectors abrupt`],
    ["colours", `${d.colours}: ${colours.join(", ") || "none"}`],
    ["left out", `${(100 * (d.colour_unreadable || 0)).toFixed(0)} % (reflections, hair, vignette)`]];
}

// The colour regions as a canvas at the picture's size: each of the six colours in its swatch, the rest clear.
function colourLayer(drawing) {
  const [width, height] = drawing.classes_size;
  const canvas = Object.assign(document.createElement("canvas"), {width, height});
  const context = canvas.getContext("2d"), picture = context.createImageData(width, height);
  drawing.classes.forEach((c, i) => {
    const rgb = LESION_PALETTE[drawing.colours[c]];
    if (rgb) picture.data.set([...rgb, 255], 4 * i);
  });
  context.putImageData(picture, 0, 0);
  return canvas;
}

// On a context whose pixels are the image's own (scaled by `scale` where the canvas is smaller or larger).
function drawLesion(context, drawing, {colours = true, axes = true, opacity = 0.6, scale = 1} = {}) {
  if (!drawing || !drawing.axes) return;
  const width = context.canvas.width, height = context.canvas.height;
  if (colours) {
    context.save();
    context.globalAlpha = opacity;
    context.imageSmoothingEnabled = false;
    context.drawImage(drawing.layer || (drawing.layer = colourLayer(drawing)), 0, 0, width, height);
    context.restore();
  }
  if (!axes) return;
  const shown = context.canvas.getBoundingClientRect().width;
  const k = shown > 0 ? width / shown : 1;  // canvas pixels per screen pixel: lines and labels the same size on screen
  context.save();
  context.font = `${12 * k}px system-ui, sans-serif`;
  for (const line of drawing.axes) {
    const [[x0, y0], [x1, y1]] = line.ends.map(([x, y]) => [x * scale, y * scale]);
    const asymmetric = line.asymmetric_in.length > 0;
    context.strokeStyle = asymmetric ? "#ff3b30" : "#ffffff";
    context.lineWidth = 2 * k;
    context.setLineDash(asymmetric ? [8 * k, 5 * k] : []);
    context.beginPath(); context.moveTo(x0, y0); context.lineTo(x1, y1); context.stroke();
    const label = `${line.axis}: ${asymmetric ? line.asymmetric_in.join(", ").replace("texture", "structure") : "symmetric"}`;
    const w = context.measureText(label).width;
    const x = Math.max(0, Math.min(x1 + 4 * k, width - w - 6 * k)), y = Math.max(16 * k, Math.min(y1, height - 4 * k));
    context.fillStyle = "rgba(0,0,0,0.6)";
    context.fillRect(x, y - 14 * k, w + 6 * k, 18 * k);
    context.fillStyle = "#fff";
    context.fillText(label, x + 3 * k, y);
  }
  context.restore();
}
