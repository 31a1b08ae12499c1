locals {
  tags         = merge(var.tags, { "karrots:module" = "eks" })
  policies_dir = coalesce(var.policies_dir, "${path.module}/../../policies")
}

# Roles: the control plane's and the nodes', with AWS's managed policies for each.
resource "aws_iam_role" "cluster" {
  name                 = "${var.name}-cluster"
  assume_role_policy   = templatefile("${local.policies_dir}/karrots-eks-cluster-trust.json", {})
  permissions_boundary = var.permissions_boundary
  tags                 = local.tags
}

resource "aws_iam_role_policy_attachment" "cluster" {
  role       = aws_iam_role.cluster.name
  policy_arn = "arn:aws:iam::aws:policy/AmazonEKSClusterPolicy"
}

resource "aws_iam_role" "node" {
  name                 = "${var.name}-node"
  assume_role_policy   = templatefile("${local.policies_dir}/karrots-eks-node-trust.json", {})
  permissions_boundary = var.permissions_boundary
  tags                 = local.tags
}

resource "aws_iam_role_policy_attachment" "node" {
  for_each = toset([
    "AmazonEKSWorkerNodePolicy",
    "AmazonEKS_CNI_Policy",
    "AmazonEC2ContainerRegistryReadOnly",
  ])

  role       = aws_iam_role.node.name
  policy_arn = "arn:aws:iam::aws:policy/${each.key}"
}

# The control plane's logs, made here rather than by EKS so they are encrypted and expire.
resource "aws_cloudwatch_log_group" "control_plane" {
  name              = "/aws/eks/${var.name}/cluster"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn
  tags              = local.tags
}

# The cluster and its default node group. The API endpoint is private unless
# public_access_cidrs opens it to named networks; Kubernetes secrets are encrypted with the
# platform's key (envelope encryption); every control-plane log type is kept.
resource "aws_eks_cluster" "main" {
  # checkov:skip=CKV_AWS_339:The version is var.kubernetes_version, which the platform takes from the environment's eks.kubernetes_version (an optional() default checkov cannot evaluate); the variable's validation requires 1.29 or later.
  name                      = var.name
  role_arn                  = aws_iam_role.cluster.arn
  version                   = var.kubernetes_version
  enabled_cluster_log_types = var.control_plane_log_types

  vpc_config {
    subnet_ids              = var.subnet_ids
    endpoint_private_access = true
    endpoint_public_access  = length(var.public_access_cidrs) > 0
    public_access_cidrs     = length(var.public_access_cidrs) > 0 ? var.public_access_cidrs : null
  }

  encryption_config {
    resources = ["secrets"]
    provider {
      key_arn = var.kms_key_arn
    }
  }

  tags = local.tags
  depends_on = [
    aws_iam_role_policy_attachment.cluster,
    aws_cloudwatch_log_group.control_plane,
  ]
}

resource "aws_eks_node_group" "default" {
  cluster_name    = aws_eks_cluster.main.name
  node_group_name = "${var.name}-default"
  node_role_arn   = aws_iam_role.node.arn
  subnet_ids      = var.subnet_ids
  instance_types  = var.node_instance_types

  scaling_config {
    min_size     = var.node_count.min
    desired_size = var.node_count.desired
    max_size     = var.node_count.max
  }

  tags       = local.tags
  depends_on = [aws_iam_role_policy_attachment.node]
}
