'use strict';
// One explicit time step of 2D advection-diffusion on the periodic unit square, in float64:
//
//     du/dt = nu * (d2u/dx2 + d2u/dy2) - a * du/dx        (each channel on its own)
//
// with per-row physical parameters params[n] = [nu, a]: the diffusivity nu >= 0 and a wind of
// speed a along x (the last, W axis). Second differences for diffusion, first-order upwind
// differences for advection. Row n of the answer depends only on row n of the inputs.
//
// The arithmetic order below is part of the example's contract: a NumPy reimplementation that
// evaluates the same expressions in the same order gets bit-identical results (IEEE-754
// doubles round every + - * / the same way in both).

const N_PARAMS = 2;

/**
 * Largest dt for which the explicit step is stable (and keeps the maximum principle).
 * @param {number} nu diffusivity
 * @param {number} a wind speed along x
 * @param {number} height grid cells along y (H)
 * @param {number} width grid cells along x (W)
 * @returns {number} the bound on dt (Infinity when nu = a = 0)
 */
function maxStableDt(nu, a, height, width) {
  const dx = 1 / width;
  const dy = 1 / height;
  return 1 / (2 * nu * (1 / (dx * dx) + 1 / (dy * dy)) + Math.abs(a) / dx);
}

/**
 * Advance every row by dt.
 * @param {Float64Array} state [N, C, H, W], row-major
 * @param {Float64Array} params [N, 2], rows of [nu, a]
 * @param {number[]} shape [N, C, H, W]
 * @param {number} dt time step
 * @returns {Float64Array} the next state [N, C, H, W]
 */
function step(state, params, shape, dt) {
  const [rows, channels, height, width] = shape;
  const dx = 1 / width;
  const dy = 1 / height;
  const next = new Float64Array(state.length);
  for (let n = 0; n < rows; n++) {
    const nu = params[n * N_PARAMS];
    const a = params[n * N_PARAMS + 1];
    const kx = dt * nu / (dx * dx);
    const ky = dt * nu / (dy * dy);
    const ka = dt * a / dx;
    for (let c = 0; c < channels; c++) {
      const plane = (n * channels + c) * height * width;
      for (let i = 0; i < height; i++) {
        const row = plane + i * width;
        const rowUp = plane + ((i + height - 1) % height) * width; // y - dy
        const rowDown = plane + ((i + 1) % height) * width; // y + dy
        for (let j = 0; j < width; j++) {
          const left = (j + width - 1) % width;
          const right = (j + 1) % width;
          const u = state[row + j];
          const l = state[row + left];
          const r = state[row + right];
          const lapX = r - 2 * u + l;
          const lapY = state[rowDown + j] - 2 * u + state[rowUp + j];
          const upwind = a >= 0 ? u - l : r - u;
          next[row + j] = u + kx * lapX + ky * lapY - ka * upwind;
        }
      }
    }
  }
  return next;
}

module.exports = { N_PARAMS, maxStableDt, step };
