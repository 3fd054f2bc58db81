// sector-2d: 2-D field of view of a curved (convex) probe: an annular sector, for DOLFINx (gmshio).
// Units: millimetres. Apex (virtual source) at (30, 60), above the tissue; inner radius 20 mm
// (the probe surface), outer radius 60 mm, opening angle 60 degrees (+-30 degrees about the
// downward vertical). y is the depth axis, growing upward to the probe: the probe arc spans
// y = 40..42.68 and the deepest point is (30, 0); x spans [0, 60]. All coordinates are >= 0.
// Triangles, first order, element size 1.4 mm.
// Physical groups (by name):
//   curve   "load"    inner arc (the probe)
//   curve   "support" outer arc (the deepest tissue)
//   surface "tissue"  the whole domain
// The two straight radial edges are untagged (traction free).
// Remake with `make meshes` (gmsh -2 sector-2d.geo -o sector-2d.msh).

xa = 30; ya = 60;          // apex
r_in = 20; r_out = 60;
half = Pi / 6;             // half opening angle, 30 degrees
h = 1.4;

Point(1) = {xa, ya, 0, h};                                          // apex (arc centre only)
Point(2) = {xa - r_in * Sin(half), ya - r_in * Cos(half), 0, h};    // inner, left
Point(3) = {xa + r_in * Sin(half), ya - r_in * Cos(half), 0, h};    // inner, right
Point(4) = {xa + r_out * Sin(half), ya - r_out * Cos(half), 0, h};  // outer, right
Point(5) = {xa - r_out * Sin(half), ya - r_out * Cos(half), 0, h};  // outer, left
Point(6) = {xa, ya - r_out, 0, h};                                  // outer, deepest (y = 0)
Circle(1) = {2, 1, 3};     // inner arc (probe)
Line(2) = {3, 4};          // right radial edge
Circle(3) = {4, 1, 6};     // outer arc, right half
Circle(4) = {6, 1, 5};     // outer arc, left half
Line(5) = {5, 2};          // left radial edge
Curve Loop(1) = {1, 2, 3, 4, 5};
Plane Surface(1) = {1};

Physical Curve("load") = {1};
Physical Curve("support") = {3, 4};
Physical Surface("tissue") = {1};

Mesh.MeshSizeFromCurvature = 0;
Mesh.Algorithm = 6;          // Frontal-Delaunay: fixed, deterministic
Mesh.ElementOrder = 1;
Mesh.MshFileVersion = 4.1;
Mesh.Binary = 0;
Mesh.SaveAll = 0;            // only elements of physical groups (the apex is not saved)
General.NumThreads = 1;
