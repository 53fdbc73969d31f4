import torch

import rayleighflow as rf

torch.manual_seed(0)
data = rf.load_sklearn("iris")                           # standardized, float64, labels 0..2
net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
problem = rf.Problem(rf.Model(net.double()), data, "cross-entropy")
result = rf.gradient_flow(problem, t_max=50.0)           # the gradient flow, recorded
cert = rf.certify(result.trajectory, "cross-entropy")    # KL certificate, observed μ*
print(cert.describe())
print("L ≤", cert.bound_final, "at t =", cert.horizon)
