// box-3d: 3-D block of tissue under a matrix probe, for DOLFINx (gmshio).
// Units: millimetres. x, y in [0, 30] (lateral), z in [0, 20] (depth axis, probe at the top z = 20).
// Tetrahedra, first order, element size 3 mm (small on purpose: the tests run on it under MPI).
// Physical groups (by name):
//   surface "load"    top face z = 20 (the probe)
//   surface "support" bottom face z = 0
//   volume  "tissue"  the whole domain
// The four side faces are untagged (traction free).
// Remake with `make meshes` (gmsh -3 box-3d.geo -o box-3d.msh).

lx = 30; ly = 30; depth = 20;
h = 3.0;

Point(1) = {0, 0, 0, h};
Point(2) = {lx, 0, 0, h};
Point(3) = {lx, ly, 0, h};
Point(4) = {0, ly, 0, h};
Line(1) = {1, 2};
Line(2) = {2, 3};
Line(3) = {3, 4};
Line(4) = {4, 1};
Curve Loop(1) = {1, 2, 3, 4};
Plane Surface(1) = {1};                        // bottom face z = 0
top[] = Extrude {0, 0, depth} { Surface{1}; };  // top[0]: top face, top[1]: volume, then sides

Physical Surface("load") = {top[0]};
Physical Surface("support") = {1};
Physical Volume("tissue") = {top[1]};

Mesh.MeshSizeFromCurvature = 0;
Mesh.Algorithm = 6;          // surfaces: Frontal-Delaunay
Mesh.Algorithm3D = 1;        // volume: Delaunay; both fixed, deterministic
Mesh.ElementOrder = 1;
Mesh.MshFileVersion = 4.1;
Mesh.Binary = 0;
Mesh.SaveAll = 0;            // only elements of physical groups
General.NumThreads = 1;
