// roi-2d: 2-D rectangular region of interest under a linear probe, for DOLFINx (gmshio).
// Units: millimetres. x in [0, 40] (lateral), y in [0, 30] (depth axis, probe at the top y = 30).
// Triangles, first order; element size 0.9 mm, refined to 0.45 mm in a disc of radius 5 mm
// around (20, 15) (where an inclusion sits), with a 2 mm transition ring.
// Physical groups (by name):
//   curve   "load"    top edge y = 30 (the probe: prescribed displacement)
//   curve   "support" bottom edge y = 0
//   surface "tissue"  the whole domain
// The side edges x = 0 and x = 40 are untagged (traction free).
// Remake with `make meshes` (gmsh -2 roi-2d.geo -o roi-2d.msh).

width = 40;
depth = 30;
h = 0.9;         // element size outside the refined zone
h_fine = 0.45;   // element size in the refined zone
xc = 20; yc = 15; radius = 5; ring = 2;

Point(1) = {0, 0, 0, h};
Point(2) = {width, 0, 0, h};
Point(3) = {width, depth, 0, h};
Point(4) = {0, depth, 0, h};
Line(1) = {1, 2};   // bottom
Line(2) = {2, 3};   // right
Line(3) = {3, 4};   // top
Line(4) = {4, 1};   // left
Curve Loop(1) = {1, 2, 3, 4};
Plane Surface(1) = {1};

// Size field: h_fine within the disc, growing linearly to h over the ring around it.
Point(5) = {xc, yc, 0, h};
Field[1] = Distance;
Field[1].PointsList = {5};
Field[2] = Threshold;
Field[2].InField = 1;
Field[2].SizeMin = h_fine;
Field[2].SizeMax = h;
Field[2].DistMin = radius;
Field[2].DistMax = radius + ring;
Background Field = 2;

Physical Curve("load") = {3};
Physical Curve("support") = {1};
Physical Surface("tissue") = {1};

Mesh.MeshSizeFromPoints = 0;
Mesh.MeshSizeFromCurvature = 0;
Mesh.MeshSizeExtendFromBoundary = 0;
Mesh.Algorithm = 6;          // Frontal-Delaunay: fixed, deterministic
Mesh.ElementOrder = 1;
Mesh.MshFileVersion = 4.1;
Mesh.Binary = 0;
Mesh.SaveAll = 0;            // only elements of physical groups
General.NumThreads = 1;
