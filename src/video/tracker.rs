//! SORT (Bewley et al. 2016): each face a constant-velocity Kalman filter over (centre x, centre y,
//! area, aspect ratio); detections matched to the filters' predictions by the Hungarian method on IoU.
//! Ids are given on the first detection (SORT's `min_hits` of 1), so every drawn face has one.

/// State x = [u, v, s, r, u', v', s'], measurement z = [u, v, s, r].
const NX: usize = 7;
const NZ: usize = 4;

type Mat = Vec<Vec<f64>>;

fn zeros(r: usize, c: usize) -> Mat {
    vec![vec![0.0; c]; r]
}

fn mul(a: &Mat, b: &Mat) -> Mat {
    let mut o = zeros(a.len(), b[0].len());
    for (i, row) in a.iter().enumerate() {
        for (k, &aik) in row.iter().enumerate() {
            if aik != 0.0 {
                for (j, &bkj) in b[k].iter().enumerate() {
                    o[i][j] += aik * bkj;
                }
            }
        }
    }
    o
}

fn transpose(a: &Mat) -> Mat {
    (0..a[0].len()).map(|j| a.iter().map(|r| r[j]).collect()).collect()
}

/// Gauss-Jordan inverse with partial pivoting; None when singular.
fn inverse(a: &Mat) -> Option<Mat> {
    let n = a.len();
    let mut m: Mat = a
        .iter()
        .enumerate()
        .map(|(i, r)| [r.clone(), (0..n).map(|j| (i == j) as u8 as f64).collect()].concat())
        .collect();
    for c in 0..n {
        let p = (c..n).max_by(|&i, &j| m[i][c].abs().total_cmp(&m[j][c].abs()))?;
        if m[p][c].abs() < 1e-12 {
            return None;
        }
        m.swap(c, p);
        let d = m[c][c];
        m[c].iter_mut().for_each(|v| *v /= d);
        for r in 0..n {
            if r != c {
                let f = m[r][c];
                if f != 0.0 {
                    let pivot = m[c].clone();
                    m[r].iter_mut().zip(&pivot).for_each(|(v, p)| *v -= f * p);
                }
            }
        }
    }
    Some(m.into_iter().map(|r| r[n..].to_vec()).collect())
}

fn to_z(b: &[f32; 4]) -> [f64; NZ] {
    let (w, h) = ((b[2] - b[0]) as f64, (b[3] - b[1]) as f64);
    [b[0] as f64 + w / 2.0, b[1] as f64 + h / 2.0, w * h, w / h.max(1e-6)]
}

fn to_box(x: &[f64]) -> [f32; 4] {
    let w = (x[2].max(0.0) * x[3].max(0.0)).sqrt();
    let h = if w > 0.0 { x[2] / w } else { 0.0 };
    [(x[0] - w / 2.0) as f32, (x[1] - h / 2.0) as f32, (x[0] + w / 2.0) as f32, (x[1] + h / 2.0) as f32]
}

pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f64 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0) as f64;
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0) as f64;
    let inter = iw * ih;
    let area = |r: &[f32; 4]| ((r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0)) as f64;
    let union = area(a) + area(b) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

struct Track {
    id: u64,
    x: Vec<f64>,
    p: Mat,
    since_update: u32,
}

impl Track {
    fn new(id: u64, b: &[f32; 4]) -> Track {
        let z = to_z(b);
        let mut x = vec![0.0; NX];
        x[..NZ].copy_from_slice(&z);
        let mut p = zeros(NX, NX);
        // Unobserved velocities start very uncertain (SORT's P[4:,4:] *= 1000, then P *= 10).
        for (i, row) in p.iter_mut().enumerate() {
            row[i] = if i >= NZ { 10_000.0 } else { 10.0 };
        }
        Track { id, x, p, since_update: 0 }
    }

    fn f() -> Mat {
        let mut f = zeros(NX, NX);
        for (i, row) in f.iter_mut().enumerate() {
            row[i] = 1.0;
        }
        f[0][4] = 1.0;
        f[1][5] = 1.0;
        f[2][6] = 1.0;
        f
    }

    fn predict(&mut self) -> [f32; 4] {
        if self.x[6] + self.x[2] <= 0.0 {
            self.x[6] = 0.0;
        }
        let f = Track::f();
        let x: Mat = self.x.iter().map(|&v| vec![v]).collect();
        self.x = mul(&f, &x).into_iter().map(|r| r[0]).collect();
        let mut p = mul(&mul(&f, &self.p), &transpose(&f));
        let q = [1.0, 1.0, 1.0, 1.0, 0.01, 0.01, 0.0001];
        for (i, qi) in q.iter().enumerate() {
            p[i][i] += qi;
        }
        self.p = p;
        self.since_update += 1;
        to_box(&self.x)
    }

    fn update(&mut self, b: &[f32; 4]) {
        let z = to_z(b);
        let mut h = zeros(NZ, NX);
        for (i, row) in h.iter_mut().enumerate() {
            row[i] = 1.0;
        }
        let ht = transpose(&h);
        let mut s = mul(&mul(&h, &self.p), &ht);
        let r = [1.0, 1.0, 10.0, 10.0];
        for (i, ri) in r.iter().enumerate() {
            s[i][i] += ri;
        }
        let Some(si) = inverse(&s) else { return };
        let k = mul(&mul(&self.p, &ht), &si);
        let y: Vec<f64> = (0..NZ).map(|i| z[i] - self.x[i]).collect();
        for (i, row) in k.iter().enumerate() {
            self.x[i] += row.iter().zip(&y).map(|(a, b)| a * b).sum::<f64>();
        }
        let mut ikh = mul(&k, &h);
        for (i, row) in ikh.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = (i == j) as u8 as f64 - *v;
            }
        }
        self.p = mul(&ikh, &self.p);
        self.since_update = 0;
    }
}

/// The minimum-cost assignment of rows to columns (each used at most once): for each row, its column.
/// Shortest augmenting paths with potentials, O(n²m) for n ≤ m; a wider-than-tall matrix is transposed.
pub fn hungarian(cost: &[Vec<f64>]) -> Vec<Option<usize>> {
    let n = cost.len();
    let m = cost.first().map_or(0, Vec::len);
    if n == 0 || m == 0 {
        return vec![None; n];
    }
    if n > m {
        let t: Vec<Vec<f64>> = (0..m).map(|j| (0..n).map(|i| cost[i][j]).collect()).collect();
        let mut rows = vec![None; n];
        for (j, i) in hungarian(&t).into_iter().enumerate() {
            if let Some(i) = i {
                rows[i] = Some(j);
            }
        }
        return rows;
    }
    // 1-based arrays, column 0 a sentinel (the classic formulation).
    let (mut u, mut v) = (vec![0.0; n + 1], vec![0.0; m + 1]);
    let (mut p, mut way) = (vec![0usize; m + 1], vec![0usize; m + 1]);
    for i in 1..=n {
        p[0] = i;
        let mut j0 = 0;
        let mut minv = vec![f64::INFINITY; m + 1];
        let mut used = vec![false; m + 1];
        loop {
            used[j0] = true;
            let i0 = p[j0];
            let (mut delta, mut j1) = (f64::INFINITY, 0);
            for j in 1..=m {
                if !used[j] {
                    let cur = cost[i0 - 1][j - 1] - u[i0] - v[j];
                    if cur < minv[j] {
                        minv[j] = cur;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=m {
                if used[j] {
                    u[p[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if p[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut rows = vec![None; n];
    for j in 1..=m {
        if p[j] != 0 {
            rows[p[j] - 1] = Some(j - 1);
        }
    }
    rows
}

/// Face ids across frames.
pub struct Tracker {
    tracks: Vec<Track>,
    next_id: u64,
    /// Frames a track survives without a detection (its prediction keeps moving).
    pub max_age: u32,
    /// A match needs at least this IoU with the prediction.
    pub iou_threshold: f64,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker { tracks: Vec::new(), next_id: 1, max_age: 5, iou_threshold: 0.3 }
    }
}

impl Tracker {
    /// One frame's boxes in; the id of each box out.
    pub fn update(&mut self, boxes: &[[f32; 4]]) -> Vec<u64> {
        let predicted: Vec<[f32; 4]> = self.tracks.iter_mut().map(Track::predict).collect();
        // A filter driven to NaN by a degenerate box is dropped, as SORT does.
        let keep: Vec<bool> = predicted.iter().map(|b| b.iter().all(|v| v.is_finite())).collect();
        let cost: Vec<Vec<f64>> = boxes.iter().map(|b| predicted.iter().map(|t| -iou(b, t)).collect()).collect();
        let assignment = hungarian(&cost);
        let mut ids = Vec::with_capacity(boxes.len());
        for (d, b) in boxes.iter().enumerate() {
            let matched = assignment[d].filter(|&t| keep[t] && -cost[d][t] >= self.iou_threshold);
            match matched {
                Some(t) => {
                    self.tracks[t].update(b);
                    ids.push(self.tracks[t].id);
                }
                None => {
                    let id = self.next_id;
                    self.next_id += 1;
                    ids.push(id);
                    self.tracks.push(Track::new(id, b));
                }
            }
        }
        let mut i = 0;
        self.tracks.retain(|t| {
            let ok = t.since_update <= self.max_age && (i >= keep.len() || keep[i]);
            i += 1;
            ok
        });
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hungarian_finds_the_optimum_where_greedy_does_not() {
        // Greedy takes (0,0)=1 then (1,1)=10: 11. The optimum is (0,1)+(1,0) = 2+2 = 4.
        let cost = vec![vec![1.0, 2.0], vec![2.0, 10.0]];
        assert_eq!(hungarian(&cost), vec![Some(1), Some(0)]);
        let tall = vec![vec![5.0], vec![1.0], vec![3.0]];
        assert_eq!(hungarian(&tall), vec![None, Some(0), None]);
        let wide = vec![vec![4.0, 1.0, 3.0]];
        assert_eq!(hungarian(&wide), vec![Some(1)]);
        assert_eq!(hungarian(&[]), Vec::<Option<usize>>::new());
    }

    #[test]
    fn hungarian_matches_brute_force_on_small_matrices() {
        let mut seed = 12345u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as f64 / (1u64 << 31) as f64
        };
        for _ in 0..50 {
            let cost: Vec<Vec<f64>> = (0..4).map(|_| (0..4).map(|_| rnd()).collect()).collect();
            let got: f64 = hungarian(&cost).iter().enumerate().map(|(i, j)| cost[i][j.unwrap()]).sum();
            let mut best = f64::INFINITY;
            let mut perm = [0, 1, 2, 3];
            permute(&mut perm, 0, &mut |p| best = best.min((0..4).map(|i| cost[i][p[i]]).sum()));
            assert!((got - best).abs() < 1e-12, "{got} vs {best}");
        }
    }

    fn permute(a: &mut [usize; 4], k: usize, f: &mut impl FnMut(&[usize; 4])) {
        if k == a.len() {
            return f(a);
        }
        for i in k..a.len() {
            a.swap(k, i);
            permute(a, k + 1, f);
            a.swap(k, i);
        }
    }

    #[test]
    fn ids_follow_moving_faces_and_a_lost_face_gets_a_new_one() {
        let mut t = Tracker::default();
        let face = |x: f32, y: f32| [x, y, x + 40.0, y + 50.0];
        let first = t.update(&[face(10.0, 10.0), face(200.0, 30.0)]);
        assert_eq!(first, vec![1, 2]);
        for k in 1..20 {
            let k = k as f32;
            // Given in the other order: ids follow the boxes, not the list positions.
            let ids = t.update(&[face(200.0 - 6.0 * k, 30.0), face(10.0 + 12.0 * k, 10.0 + 2.0 * k)]);
            assert_eq!(ids, vec![2, 1], "frame {k}");
        }
        // Face 1 leaves; face 2 stays; past max_age frames face 1's return is a new face.
        for _ in 0..7 {
            assert_eq!(t.update(&[face(86.0, 30.0)]), vec![2]);
        }
        assert_eq!(t.update(&[face(86.0, 30.0), face(400.0, 300.0)]), vec![2, 3]);
    }
}
