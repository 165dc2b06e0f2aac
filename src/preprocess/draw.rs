//! The few OpenCV drawing primitives the keypoint maps use, rasterised pixel for pixel as OpenCV's
//! non-antialiased (LINE_8) code paths do: `ellipse2Poly`, `fillConvexPoly` (outline plus scanline
//! fill in 16-bit fixed point), `line` (8-connected Bresenham, clipped) and filled `circle`.

use image::RgbImage;

const XY_SHIFT: u32 = 16;
const XY_ONE: i64 = 1 << XY_SHIFT;

/// `sin(k°)` for k in 0..=450 as OpenCV's drawing table holds it: 7 decimals, single precision.
fn sin_table(k: i32) -> f64 {
    f64::from(((f64::from(k).to_radians().sin() * 1e7).round() / 1e7) as f32)
}

/// The integer polygon approximating an elliptic arc: `cv2.ellipse2Poly(center, axes, angle,
/// arc_start, arc_end, delta)` (angles in whole degrees, points rounded half to even, consecutive
/// duplicates dropped).
pub fn ellipse_poly(center: (i32, i32), axes: (i32, i32), angle: i32, arc: (i32, i32), delta: i32) -> Vec<(i32, i32)> {
    let mut angle = angle;
    while angle < 0 {
        angle += 360;
    }
    while angle > 360 {
        angle -= 360;
    }
    let (mut start, mut end) = if arc.0 > arc.1 { (arc.1, arc.0) } else { arc };
    while start < 0 {
        start += 360;
        end += 360;
    }
    while end > 360 {
        end -= 360;
        start -= 360;
    }
    if end - start > 360 {
        (start, end) = (0, 360);
    }
    let (alpha, beta) = (sin_table(450 - angle), sin_table(angle));
    let (cx, cy) = (f64::from(center.0), f64::from(center.1));
    let mut pts: Vec<(i32, i32)> = Vec::new();
    let mut i = start;
    while i < end + delta {
        let mut a = i.min(end);
        if a < 0 {
            a += 360;
        }
        let x = f64::from(axes.0) * sin_table(450 - a);
        let y = f64::from(axes.1) * sin_table(a);
        let pt = (
            (cx + x * alpha - y * beta).round_ties_even() as i32,
            (cy + x * beta + y * alpha).round_ties_even() as i32,
        );
        if pts.last() != Some(&pt) {
            pts.push(pt);
        }
        i += delta;
    }
    if pts.len() == 1 {
        pts = vec![center, center];
    }
    pts
}

/// Sets one pixel, ignoring points outside the image.
fn put(img: &mut RgbImage, x: i64, y: i64, color: [u8; 3]) {
    if x >= 0 && y >= 0 && x < i64::from(img.width()) && y < i64::from(img.height()) {
        img.put_pixel(x as u32, y as u32, image::Rgb(color));
    }
}

/// Fills pixels `xl..=xr` of row `y` (callers clip).
fn hline(img: &mut RgbImage, y: i64, xl: i64, xr: i64, color: [u8; 3]) {
    for x in xl..=xr {
        put(img, x, y, color);
    }
}

/// Cohen-Sutherland clipping of a segment to the image rectangle, as OpenCV's `clipLine`;
/// false when nothing of it is inside.
fn clip_line(size: (i64, i64), p1: &mut (i64, i64), p2: &mut (i64, i64)) -> bool {
    let (right, bottom) = (size.0 - 1, size.1 - 1);
    let code = |p: (i64, i64)| {
        i32::from(p.0 < 0) + i32::from(p.0 > right) * 2 + i32::from(p.1 < 0) * 4 + i32::from(p.1 > bottom) * 8
    };
    let (mut c1, mut c2) = (code(*p1), code(*p2));
    if (c1 & c2) == 0 && (c1 | c2) != 0 {
        if c1 & 12 != 0 {
            let a = if c1 < 8 { 0 } else { bottom };
            p1.0 += (a - p1.1) * (p2.0 - p1.0) / (p2.1 - p1.1);
            p1.1 = a;
            c1 = i32::from(p1.0 < 0) + i32::from(p1.0 > right) * 2;
        }
        if c2 & 12 != 0 {
            let a = if c2 < 8 { 0 } else { bottom };
            p2.0 += (a - p2.1) * (p2.0 - p1.0) / (p2.1 - p1.1);
            p2.1 = a;
            c2 = i32::from(p2.0 < 0) + i32::from(p2.0 > right) * 2;
        }
        if (c1 & c2) == 0 && (c1 | c2) != 0 {
            if c1 != 0 {
                let a = if c1 == 1 { 0 } else { right };
                p1.1 += (a - p1.0) * (p2.1 - p1.1) / (p2.0 - p1.0);
                p1.0 = a;
                c1 = 0;
            }
            if c2 != 0 {
                let a = if c2 == 1 { 0 } else { right };
                p2.1 += (a - p2.0) * (p2.1 - p1.1) / (p2.0 - p1.0);
                p2.0 = a;
                c2 = 0;
            }
        }
    }
    (c1 | c2) == 0
}

/// An 8-connected line from `p1` to `p2` (both ends included), walked left to right as
/// OpenCV's `LineIterator` does so the same pixels are chosen.
pub fn line(img: &mut RgbImage, p1: (i32, i32), p2: (i32, i32), color: [u8; 3]) {
    let size = (i64::from(img.width()), i64::from(img.height()));
    let (mut p1, mut p2) = ((i64::from(p1.0), i64::from(p1.1)), (i64::from(p2.0), i64::from(p2.1)));
    let outside = |p: (i64, i64)| p.0 < 0 || p.1 < 0 || p.0 >= size.0 || p.1 >= size.1;
    if (outside(p1) || outside(p2)) && !clip_line(size, &mut p1, &mut p2) {
        return;
    }
    let (mut dx, mut dy) = (p2.0 - p1.0, p2.1 - p1.1);
    if dx < 0 {
        (dx, dy) = (-dx, -dy);
        p1 = p2;
    }
    let step_y = if dy < 0 { -1 } else { 1 };
    dy = dy.abs();
    let vertical = dy > dx;
    if vertical {
        (dx, dy) = (dy, dx);
    }
    let mut err = dx - 2 * dy;
    let (mut x, mut y) = p1;
    for _ in 0..=dx {
        put(img, x, y, color);
        let minor = err < 0;
        err += -2 * dy + if minor { 2 * dx } else { 0 };
        if vertical {
            y += step_y;
            x += i64::from(minor);
        } else {
            x += 1;
            y += if minor { step_y } else { 0 };
        }
    }
}

/// `cv2.fillConvexPoly(img, pts, color)` with integer points (shift 0, LINE_8): the outline drawn
/// with [`line`], then each row filled between the two edges tracked in 16-bit fixed point.
pub fn fill_convex_poly(img: &mut RgbImage, pts: &[(i32, i32)], color: [u8; 3]) {
    let n = pts.len();
    if n == 0 {
        return;
    }
    let v: Vec<(i64, i64)> = pts.iter().map(|&(x, y)| (i64::from(x), i64::from(y))).collect();
    let (width, height) = (i64::from(img.width()), i64::from(img.height()));
    let mut imin = 0;
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (v[0].0, v[0].0, v[0].1, v[0].1);
    let mut p0 = pts[n - 1];
    for (i, (&p, &(x, y))) in pts.iter().zip(&v).enumerate() {
        if y < ymin {
            ymin = y;
            imin = i;
        }
        ymax = ymax.max(y);
        xmax = xmax.max(x);
        xmin = xmin.min(x);
        line(img, p0, p, color);
        p0 = p;
    }
    if n < 3 || xmax < 0 || ymax < 0 || xmin >= width || ymin >= height {
        return;
    }
    ymax = ymax.min(height - 1);
    // Per edge: index of its end vertex, walking direction, x and dx in fixed point, end row.
    let mut idx = [imin, imin];
    let di = [1, n - 1];
    let (mut ex, mut edx, mut ye) = ([-XY_ONE; 2], [0i64; 2], [ymin; 2]);
    let mut edges = n as i64;
    let mut y = ymin;
    loop {
        for i in 0..2 {
            if y >= ye[i] {
                let mut idx0 = idx[i];
                let mut next = (idx0 + di[i]) % n;
                loop {
                    let more = edges > 0;
                    edges -= 1;
                    if !more {
                        break;
                    }
                    let ty = v[next].1;
                    if ty > y {
                        let (xs, xe) = (v[idx0].0 << XY_SHIFT, v[next].0 << XY_SHIFT);
                        ye[i] = ty;
                        edx[i] = ((xe - xs) * 2 + (ty - y)) / (2 * (ty - y));
                        ex[i] = xs;
                        idx[i] = next;
                        break;
                    }
                    idx0 = next;
                    next = (next + di[i]) % n;
                }
            }
        }
        if edges < 0 {
            break;
        }
        if y >= 0 {
            let (left, right) = if ex[0] > ex[1] { (1, 0) } else { (0, 1) };
            let xx1 = (ex[left] + (XY_ONE >> 1)) >> XY_SHIFT;
            let xx2 = (ex[right] + (XY_ONE >> 1)) >> XY_SHIFT;
            if xx2 >= 0 && xx1 < width {
                hline(img, y, xx1.max(0), xx2.min(width - 1), color);
            }
        }
        ex[0] += edx[0];
        ex[1] += edx[1];
        y += 1;
        if y > ymax {
            break;
        }
    }
}

/// `cv2.circle(img, center, radius, color, -1)`: a filled midpoint circle (LINE_8).
pub fn fill_circle(img: &mut RgbImage, center: (i32, i32), radius: i32, color: [u8; 3]) {
    let (w, h) = (i64::from(img.width()), i64::from(img.height()));
    let (cx, cy) = (i64::from(center.0), i64::from(center.1));
    let (mut err, mut dx, mut dy, mut plus, mut minus) =
        (0i64, i64::from(radius), 0i64, 1i64, 2 * i64::from(radius) - 1);
    let mut span = |y: i64, xl: i64, xr: i64| {
        if (0..h).contains(&y) {
            hline(img, y, xl.max(0), xr.min(w - 1), color);
        }
    };
    while dx >= dy {
        let (x11, x12, x21, x22) = (cx - dx, cx + dx, cx - dy, cx + dy);
        if x11 < w && x12 >= 0 && cy - dx < h && cy + dx >= 0 {
            span(cy - dy, x11, x12);
            span(cy + dy, x11, x12);
            if x21 < w && x22 >= 0 {
                span(cy - dx, x21, x22);
                span(cy + dx, x21, x22);
            }
        }
        dy += 1;
        err += plus;
        plus += 2;
        if err > 0 {
            err -= minus;
            dx -= 1;
            minus -= 2;
        }
    }
}
